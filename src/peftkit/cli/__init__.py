"""The ``peftkit`` command: ``train``, ``eval``, ``generate``, ``merge``, ``inspect``, ``prune``, ``quantize``,
``serve``, ``as-peft``.

Every flag of ``peftkit train`` is generated from a config dataclass: :class:`~peftkit.train.ModelArgs`,
:class:`~peftkit.train.DataConfig`, :class:`~peftkit.train.TrainConfig` and the chosen method's own
config (``--method lora`` adds ``--r``, ``--lora-alpha``, ``--target-modules``, ...; ``--method
prompt-tuning`` adds ``--num-virtual-tokens``, ...). ``--config run.yaml`` sets the same fields from a
file; flags given on the command line win over the file, and the file wins over the defaults.
"""

from __future__ import annotations

import errno
import sys
from typing import Optional

from ..errors import PeftkitError
from .as_peft import cmd_as_peft
from .args import PROG, add_dataclass_flags, converter, merge_settings, nest, parse_set_values
from .eval import cmd_eval
from .generate import cmd_generate
from .inspect import NEAREST_TOKEN_METHODS, cmd_inspect, inspect_adapter
from .merge import cmd_merge
from .prune import cmd_prune
from .quantize import cmd_quantize
from .serve import cmd_serve
from .train import TRAIN_EPILOG, build_train_parser, cmd_train

_nest = nest  # the name the tests import

__all__ = ["COMMANDS", "NEAREST_TOKEN_METHODS", "PROG", "TRAIN_EPILOG", "add_dataclass_flags", "build_train_parser",
           "cmd_as_peft", "cmd_eval", "cmd_generate", "cmd_inspect", "cmd_merge", "cmd_prune", "cmd_quantize", "cmd_serve",
           "cmd_train", "converter", "inspect_adapter", "main", "merge_settings", "nest", "parse_set_values"]


# ---------------------------------------------------------------------------------------------

COMMANDS = {
    "train": (cmd_train, "fine-tune a model with a PEFT method (default: LoRA on the bundled model and data)"),
    "eval": (cmd_eval, "compute task metrics of a model + adapter on a data file"),
    "generate": (cmd_generate, "generate with one or several adapters (mixed batches)"),
    "merge": (cmd_merge, "merge an adapter into a standalone Hugging Face model folder"),
    "inspect": (cmd_inspect, "print an adapter's config, parameter counts, size, tensor shapes (and a soft "
                           "prompt's nearest tokens)"),
    "prune": (cmd_prune, "prune a model (magnitude / Wanda, unstructured, N:M or whole heads / channels), with a report"),
    "quantize": (cmd_quantize, "quantize a (merged) model folder to int8 for CPU inference, with a size/latency report"),
    "serve": (cmd_serve, "serve a base model and many adapters of every kind (OpenAI-compatible, continuously batched)"),
    "as-peft": (cmd_as_peft, "run a Python tool (lm_eval, trl, a script) with peftkit installed as `peft`"),
}


def _usage() -> str:
    from .. import __version__

    lines = [f"usage: {PROG} <command> [options]   (peftkit {__version__})", "",
             "Parameter-efficient fine-tuning from the command line.", "", "commands:"]
    lines += [f"  {name:<10} {text}" for name, (_, text) in COMMANDS.items()]
    lines += ["", f"Run `{PROG} <command> --help` for a command's flags. `{PROG} train` with no flags fine-tunes the",
              "bundled stories260k model with LoRA on bundled E2E NLG demo data (a few minutes on a CPU)."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("--version", "-V"):
        from .. import __version__

        print(f"peftkit {__version__}")
        return 0
    command = argv[0]
    if command not in COMMANDS:
        from ..errors import closest

        hint = closest(command, COMMANDS)
        print(f"{PROG}: unknown command {command!r}" + (f" (did you mean {hint[0]!r}?)" if hint else "")
              + f"; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    try:
        return COMMANDS[command][0](argv[1:]) or 0
    except PeftkitError as exc:  # bad input: one line saying what is wrong and what to do
        print(f"{PROG} {command}: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in _ENVIRONMENT_ERRNOS:
            raise  # anything else is a bug: its traceback is wanted
        where = f"{exc.filename}: " if exc.filename else ""
        print(f"{PROG} {command}: error: {where}{exc.strerror}; check the permissions and the free space there, or "
              "choose another path.", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG} {command}: interrupted", file=sys.stderr)
        return 130


# file-system errors the user fixes (permissions, a read-only or full disk): one line, not a traceback
_ENVIRONMENT_ERRNOS = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT}


def _one_line(text: str) -> str:
    return " ".join(part.strip() for part in text.strip().splitlines() if part.strip())
