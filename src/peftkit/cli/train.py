"""``peftkit train``: its parser (flags from the config dataclasses and the chosen method's config) and command."""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Any, Optional

from ..errors import PeftkitError
from .args import PROG, Formatter, Parser, add_dataclass_flags, merge_settings, nest, parse_set_values


TRAIN_EPILOG = """\
examples:
  peftkit train                                   # LoRA on the bundled model and demo data (minutes on a CPU)
  peftkit train --method dora --r 16 --max-steps 200 --output-dir runs/dora
  peftkit train --model ./my-model --data train.jsonl --eval-data dev.jsonl --columns source=mr,target=ref
  peftkit train --config run.yaml --lr 5e-4          # flags override the file
  peftkit train --output-dir runs/x --resume         # continue from the newest complete checkpoint
  torchrun --nproc_per_node=2 -m peftkit train --batch-size 32 ...   # data parallel, same global batch

Method fields: `peftkit train --method NAME --help` lists the flags of that method.
"""


def _preparse_method(argv: list[str]) -> tuple[str, Optional[dict[str, Any]]]:
    pre = Parser(add_help=False)
    pre.add_argument("--config")
    pre.add_argument("--method")
    known, _ = pre.parse_known_args(argv)
    file_values = None
    method = known.method
    if known.config:
        from ..train.config import load_yaml

        file_values = load_yaml(known.config)
        if method is None:
            section = file_values.get("model")
            method = section.get("method") if isinstance(section, dict) else None
            method = method or file_values.get("method")
    return str(method or "lora"), file_values


def build_train_parser(method: str = "lora") -> argparse.ArgumentParser:
    from ..train.config import DataConfig, ModelArgs, TrainConfig
    from ..train.modeling import BASE_FIELDS, method_names, resolve_method

    names = sorted(method_names())
    parser = Parser(
        prog=f"{PROG} train", formatter_class=Formatter, epilog=TRAIN_EPILOG, allow_abbrev=False,
        description="Fine-tune a model with a PEFT method and save the adapter, metrics, a loss plot, the resolved "
                    "settings and resumable checkpoints into --output-dir.")
    parser.add_argument("--config", metavar="RUN.YAML", help="read settings from a YAML file (flat keys or the "
                        "model/data/train/method_args sections of a run.yaml); flags override it")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", dest="set_values",
                        help="set any field by name, the value read as YAML (e.g. --set r=16 --set "
                             "target_modules=[q_proj,v_proj]); repeatable. Handy under torchrun, whose own flags "
                             "shadow short ones such as --r")
    taken = {"--config", "--help", "-h", "--set"}
    g = parser.add_argument_group("model and method")
    g.add_argument("--method", dest="model.method", metavar="{" + ",".join(names) + "}", default=argparse.SUPPRESS,
                   help=f"the PEFT method; one of: {', '.join(names)} (default: lora)")
    taken.add("--method")
    add_dataclass_flags(g, ModelArgs, dest_prefix="model.", skip={"method"}, taken=taken)
    try:
        canonical, cls, overrides = resolve_method(method)
    except PeftkitError:
        canonical, cls, overrides = None, None, {}
    if cls is not None:
        mg = parser.add_argument_group(f"{canonical} ({cls.__name__} fields)")
        ours = {f.name for f in dataclasses.fields(ModelArgs)} | {f.name for f in dataclasses.fields(DataConfig)} | \
            {f.name for f in dataclasses.fields(TrainConfig)}
        skip = set(BASE_FIELDS) - {"modules_to_save"}
        clash = {f.name for f in dataclasses.fields(cls)} & ours
        add_dataclass_flags(mg, cls, dest_prefix="method_args.", skip=skip | clash, defaults=overrides, taken=taken)
        if clash:  # a method field named like a toolkit field gets a --method- prefix
            sub = dataclasses.make_dataclass("_Clash", [(f.name, f.type, f) for f in dataclasses.fields(cls)
                                                        if f.name in clash])
            sub.__doc__ = cls.__doc__
            add_dataclass_flags(mg, sub, dest_prefix="method_args.", taken=taken, flag_prefix="method_")
    add_dataclass_flags(parser.add_argument_group("data"), DataConfig, dest_prefix="data.", taken=taken)
    add_dataclass_flags(parser.add_argument_group("training"), TrainConfig, dest_prefix="train.", taken=taken)
    return parser


def cmd_train(argv: list[str]) -> int:
    from ..train.config import RunConfig
    from ..train.runner import train

    method, file_values = _preparse_method(argv)
    parser = build_train_parser(method)
    args = parser.parse_args(argv)
    flags, set_values = nest(args), parse_set_values(args.set_values)
    settings = merge_settings(file_values, flags, set_values)
    shown = None
    if not settings["model"].get("model") and not settings["data"].get("data"):
        # the demo run: bundled model and data, with the demo's settings under the user's
        from ..train.config import demo_settings

        preset, user = demo_settings(settings["model"].get("method") or method), settings
        settings = merge_settings(preset, {}, None)
        for name, section in user.items():
            settings.setdefault(name, {}).update(section)
        shown = ", ".join(f"{k}={v}" for sec in preset.values() if isinstance(sec, dict) for k, v in sec.items())
    run = RunConfig.from_dict(settings, source="settings")  # every value checked before anything is printed or loaded
    if shown is not None and _is_main():
        print(f"== demo run: the bundled stories260k model and E2E NLG data; demo settings "
              f"(peftkit/assets/data/demo.yaml, under yours): {shown}")
    result = train(run)
    if result.output_dir and _is_main():
        after = "  ".join(f"{k}={v:.4f}" for k, v in result.metrics_after.items())
        print(f"done: {result.steps} steps; {after}")
        written = [n + ("/" if os.path.isdir(os.path.join(result.output_dir, n)) else "")
                   for n in sorted(os.listdir(result.output_dir))]
        print(f"wrote {result.output_dir}/: {' '.join(written)}")
    return 0


def _is_main() -> bool:
    return int(os.environ.get("RANK", "0")) == 0
