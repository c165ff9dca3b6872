"""``peftkit as-peft``: run a Python tool in this process with peftkit installed as ``peft``.

For command-line tools that import ``peft`` themselves (``lm_eval --model_args ...,peft=<folder>``,
``trl sft``, a training script that does ``from peft import ...``) and so cannot call
:func:`peftkit.install_as_peft` first::

    peftkit as-peft lm_eval --model hf --model_args pretrained=<base>,peft=<adapter> --tasks ...
    peftkit as-peft -m <module> [args]          # as python -m
    peftkit as-peft <script.py> [args]          # as python script.py

The tool runs in this same Python process (a console command is found among the installed entry points,
``console_scripts``), so the tool must be a Python one. Python processes it starts (``torchrun`` and
``accelerate launch`` workers, the ``trl`` command line's training process) install the alias at start-up:
``PEFTKIT_AS_PEFT=1`` is set and a ``sitecustomize`` folder (peftkit/as_peft_site) is put first on
``PYTHONPATH`` for them.
"""

from __future__ import annotations

import importlib.metadata
import os
import runpy
import sys

from ..errors import PeftkitError
from .args import PROG

USAGE = (f"usage: {PROG} as-peft <console command> [args] | {PROG} as-peft -m <module> [args] | "
         f"{PROG} as-peft <script.py> [args]")


def _run(call, *args, **kwargs) -> int:
    try:
        result = call(*args, **kwargs)
    except SystemExit as exc:  # the tool's own exit status is this command's
        code = exc.code
        if code is None or isinstance(code, int):
            return code or 0
        print(code, file=sys.stderr)
        return 1
    return result if isinstance(result, int) else 0


def _pass_to_child_processes() -> None:
    site = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "as_peft_site")
    os.environ["PEFTKIT_AS_PEFT"] = "1"
    os.environ["PYTHONPATH"] = os.pathsep.join([site, *filter(None, [os.environ.get("PYTHONPATH")])])


def cmd_as_peft(argv: list[str]) -> int:
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n", 1)[1].strip())
        return 0
    if argv[0] == "-m" and len(argv) < 2:
        raise PeftkitError("as-peft -m needs a module name, as python -m does.")
    from ..as_peft import install_as_peft

    _pass_to_child_processes()
    if argv[0] == "-m":
        module, rest = argv[1], argv[2:]
        install_as_peft()
        sys.argv = [module, *rest]
        return _run(runpy.run_module, module, run_name="__main__", alter_sys=True)
    target, rest = argv[0], argv[1:]
    if target.endswith(".py") or os.sep in target:
        if not os.path.isfile(target):
            raise PeftkitError(f"as-peft: no script {target}.")
        install_as_peft()
        sys.argv = [target, *rest]
        sys.path.insert(0, os.path.dirname(os.path.abspath(target)))
        return _run(runpy.run_path, target, run_name="__main__")
    points = [ep for ep in importlib.metadata.entry_points(group="console_scripts") if ep.name == target]
    if not points:
        raise PeftkitError(f"as-peft: {target!r} is not a Python console command installed in this environment "
                           f"({sys.prefix}); give a script path, -m <module>, or install the tool here.")
    install_as_peft()
    main = points[0].load()
    sys.argv = [target, *rest]
    return _run(main)


__all__ = ["USAGE", "cmd_as_peft"]
