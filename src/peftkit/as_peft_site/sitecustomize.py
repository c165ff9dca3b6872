"""Started by ``peftkit as-peft``: this folder is put first on ``PYTHONPATH`` for the tool it runs, so every
Python process the tool starts (``torchrun`` and ``accelerate launch`` workers, the ``trl`` command line's
training process) runs this at start-up and installs peftkit as ``peft`` too (``PEFTKIT_AS_PEFT=1``).
A ``sitecustomize`` module that this one hides on ``sys.path`` is run afterwards, as Python would have.
"""

import os
import sys


def _run_hidden_sitecustomize() -> None:
    here = os.path.dirname(os.path.abspath(__file__))
    for entry in sys.path:
        folder = os.path.abspath(entry or os.curdir)
        path = os.path.join(folder, "sitecustomize.py")
        if folder != here and os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                code = compile(f.read(), path, "exec")
            exec(code, {"__name__": "sitecustomize", "__file__": path})
            return


if os.environ.get("PEFTKIT_AS_PEFT") == "1":
    import peftkit

    peftkit.install_as_peft()
_run_hidden_sitecustomize()
