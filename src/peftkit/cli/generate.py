"""``peftkit generate``: completions for prompts with one or several adapters, as one mixed batch."""

from __future__ import annotations

import os
from typing import Any

from ..errors import PeftkitError
from .args import PROG, Formatter, Parser, adapter_specs, add_quantize_flag, int_at_least, quantize_arg, resolve_device


def cmd_generate(argv: list[str]) -> int:
    from ..train.data import format_prompt
    from ..train.loop import generate_texts
    from ..train.runner import data_config_of, load_for_inference, read_run_file

    p = Parser(
        prog=f"{PROG} generate", formatter_class=Formatter,
        description="Generate completions for prompts with one or several adapters. All rows (prompt x adapter) run "
                    "as one mixed batch: each row through its own adapter.",
        epilog="examples:\n"
               "  peftkit generate --adapter runs/a/adapter --prompt 'name[Aromi], eatType[coffee shop]'\n"
               "  peftkit generate --adapter a=runs/a/adapter --adapter b=runs/b/adapter --base --prompt 'Once upon'\n"
               "  peftkit generate --adapter a=A --adapter b=B --prompt p1 --prompt p2 --prompt-adapter a "
               "--prompt-adapter b")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="an adapter folder (repeat for several)")
    p.add_argument("--model", help="base model (default: the first adapter's base model)")
    p.add_argument("--prompt", action="append", default=[], help="a prompt (repeat for several)")
    p.add_argument("--prompts-file", help="a file with one prompt per line")
    p.add_argument("--prompt-adapter", action="append", default=[], metavar="NAME",
                   help="the adapter of each prompt, in order (base for none); default: every prompt with every adapter")
    p.add_argument("--base", action="store_true", help="also generate with the base model (no adapter)")
    p.add_argument("--raw", action="store_true", help="use the prompts as they are, not in the training data's "
                   "prompt format")
    p.add_argument("--max-new-tokens", type=int_at_least(1, "--max-new-tokens"), default=64)
    p.add_argument("--device")
    add_quantize_flag(p)
    args = p.parse_args(argv)
    prompts = list(args.prompt)
    if args.prompts_file:
        prompts += _read_prompts(args.prompts_file)
    if not prompts:
        raise PeftkitError("Give at least one --prompt (or --prompts-file).")
    specs = adapter_specs(args.adapter)
    device = resolve_device(args.device)
    for _, folder in specs:
        if not os.path.isdir(folder):
            raise PeftkitError(f"Adapter folder {folder} does not exist.")
    loaded = load_for_inference(specs, args.model, device=device, quantize=quantize_arg(args.quantize))
    names = [n for n, _ in specs]
    from ..core.mixed import BASE_ADAPTER

    if args.prompt_adapter:
        if len(args.prompt_adapter) != len(prompts):
            raise PeftkitError(f"{len(args.prompt_adapter)} --prompt-adapter values for {len(prompts)} prompts; give "
                               "one per prompt.")
        rows = [(i, BASE_ADAPTER if a in ("base", BASE_ADAPTER) else a) for i, a in enumerate(args.prompt_adapter)]
        unknown = sorted({a for _, a in rows if a != BASE_ADAPTER and a not in names})
        if unknown:
            raise PeftkitError(f"--prompt-adapter names {unknown} are not among the adapters {names}.")
    else:
        cols = (names or []) + ([BASE_ADAPTER] if args.base or not names else [])
        rows = [(i, a) for i in range(len(prompts)) for a in cols]
    # each adapter's prompt format comes from its run.yaml
    formats: dict[str, tuple[Any, Any]] = {}
    for name, folder in specs:
        run = read_run_file(folder)
        fmt = ((run or {}).get("data") or {}).get("format")
        formats[name] = (fmt, loaded.data_config if run is None else data_config_of(run))
    first = formats[names[0]] if names else (None, loaded.data_config)
    ids = []
    for i, a in rows:
        fmt, dcfg = formats.get(a, first)
        ids.append(format_prompt(prompts[i], None if args.raw else fmt, loaded.tokenizer, dcfg, loaded.task_type))
    adapter_names = [a for _, a in rows] if names else None
    texts = generate_texts(loaded.model, loaded.tokenizer, ids, loaded.task_type, device,
                           max_new_tokens=args.max_new_tokens, adapter_names=adapter_names)
    for i, prompt in enumerate(prompts):
        print(f"== prompt {i + 1}: {prompt}")
        for (j, a), text in zip(rows, texts):
            if j == i:
                label = "base" if a == BASE_ADAPTER else a
                print(f"   [{label}] {text}")
    return 0


def _read_prompts(path: str) -> list[str]:
    """The non-blank lines of ``--prompts-file``; PeftkitError if it is not a readable UTF-8 text file."""
    if os.path.isdir(path):
        raise PeftkitError(f"--prompts-file {path} is a folder; give a text file with one prompt per line.")
    try:
        with open(path, encoding="utf-8") as fh:
            return [line.rstrip("\r\n") for line in fh if line.strip()]
    except FileNotFoundError:
        raise PeftkitError(f"Prompts file {path} does not exist.") from None
    except UnicodeDecodeError as exc:
        raise PeftkitError(f"--prompts-file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}).") from None
