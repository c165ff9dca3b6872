"""``peftkit.install_as_peft()``: answer ``import peft`` with peftkit, for this process, on request.

transformers' ``Trainer``, TRL's trainers, accelerate, ``PreTrainedModel.load_adapter`` and lm-eval decide
whether a model is a PEFT model with ``isinstance(model, peft.PeftModel)``, build adapters with
``peft.get_peft_model`` and check ``importlib.metadata`` for a ``peft`` distribution. After
``install_as_peft()`` every such import gets peftkit's object of the same name, so those tools treat a
peftkit model as what it is. This is PyMySQL's ``install_as_MySQLdb()``: explicit, for the running process
only, never done on import.

How it works: a finder put first on ``sys.meta_path`` answers ``peft`` and every ``peft.<path>`` for which
``peftkit.<path>`` exists (peftkit keeps Hugging Face PEFT's import paths: ``peft.tuners.lora``,
``peft.utils.other``, ...) with a small alias module whose attributes are read from the peftkit module;
classes and functions are the very same objects. The alias packages have an empty ``__path__``, so a
``peft.<path>`` that peftkit lacks is a plain ``ModuleNotFoundError`` and never falls through to an
installed Hugging Face PEFT. The same finder reports a ``peft`` distribution to ``importlib.metadata`` with
version :data:`PEFT_API_VERSION`, the PEFT release whose API and files peftkit matches, which is what those
libraries compare against.

Modules that imported ``peft`` (or found it missing) before the call keep what they saw, so the call
refuses when the real ``peft`` or such a module is already imported: call it first, before importing
``transformers.Trainer``, ``trl`` trainers or ``lm_eval`` models. ``peftkit as-peft -- <command>`` does the
same for a console command such as ``lm_eval``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import sys
import types
from pathlib import Path
from typing import Any, Iterator, Optional

from .errors import PeftkitError
from .version import __version__

#: the Hugging Face PEFT release whose API names and checkpoint format peftkit matches (docs/compat.md)
PEFT_API_VERSION = "0.21.2"

# modules that evaluate `is_peft_available()` / `from peft import ...` when they are imported
_DECIDED_AT_IMPORT = ("transformers.trainer", "transformers.trainer_utils", "trl.trainer", "trl.experimental",
                      "trl.generation", "lm_eval.models.hf_steered")


class _AliasModule(types.ModuleType):
    """``peft.<path>``: reads every attribute it does not hold itself from ``peftkit.<path>``."""

    def __init__(self, name: str, target: types.ModuleType) -> None:
        super().__init__(name, target.__doc__)
        self.__dict__["__peftkit_module__"] = target

    def __getattr__(self, attr: str) -> Any:
        target = self.__dict__["__peftkit_module__"]
        try:
            return getattr(target, attr)
        except AttributeError:
            raise AttributeError(f"module {self.__name__!r} (peftkit's {target.__name__}, installed as peft) has no "
                                 f"attribute {attr!r}") from None

    def __repr__(self) -> str:
        return f"<module {self.__name__!r} (peftkit's {self.__dict__['__peftkit_module__'].__name__}, installed as peft)>"

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(dir(self.__dict__["__peftkit_module__"])))


class _PeftDistribution(importlib.metadata.Distribution):
    """The ``peft`` distribution ``importlib.metadata`` reports while peftkit is installed as peft."""

    def read_text(self, filename: str) -> Optional[str]:
        if filename != "METADATA":
            return None
        return (f"Metadata-Version: 2.1\nName: peft\nVersion: {PEFT_API_VERSION}\n"
                f"Summary: peftkit {__version__}, installed as peft by peftkit.install_as_peft()\n")

    def locate_file(self, path: Any) -> Path:
        return Path(__file__).parent / str(path)


class _PeftFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: Any = None, target: Any = None) -> Optional[importlib.machinery.ModuleSpec]:
        if fullname != "peft" and not fullname.startswith("peft."):
            return None
        real_name = "peftkit" + fullname[len("peft"):]
        try:
            real_spec = importlib.util.find_spec(real_name)
        except ModuleNotFoundError:
            return None
        if real_spec is None:
            return None
        spec = importlib.machinery.ModuleSpec(fullname, self, is_package=real_spec.submodule_search_locations
                                              is not None)
        spec.loader_state = real_name
        return spec

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType:
        module = _AliasModule(spec.name, importlib.import_module(spec.loader_state))
        if spec.name == "peft":
            module.__version__ = PEFT_API_VERSION
        return module

    def exec_module(self, module: types.ModuleType) -> None:
        if module.__spec__ is not None and module.__spec__.submodule_search_locations is not None:
            module.__path__ = []  # submodules come from this finder only, never from an installed peft

    def find_distributions(self, context: Any = importlib.metadata.DistributionFinder.Context()
                           ) -> Iterator[importlib.metadata.Distribution]:
        if context.name in (None, "peft"):
            yield _PeftDistribution()


def _installed_finder() -> Optional[_PeftFinder]:
    return next((f for f in sys.meta_path if isinstance(f, _PeftFinder)), None)


def is_installed_as_peft() -> bool:
    """Whether :func:`install_as_peft` has run in this process."""
    return _installed_finder() is not None


def install_as_peft() -> None:
    """Make ``import peft`` and ``import peft.<path>`` give peftkit's modules for the rest of this process.

    Idempotent. Raises :class:`~peftkit.PeftkitError`, changing nothing, when Hugging Face PEFT is already
    imported, or when a module that looks for ``peft`` at import time (``transformers.trainer``, TRL's
    trainers, lm-eval's models) was imported before the call.
    """
    if is_installed_as_peft():
        return
    real = sorted(name for name in sys.modules if name == "peft" or name.startswith("peft."))
    if real:
        where = getattr(sys.modules.get("peft"), "__file__", None) or real[0]
        raise PeftkitError(f"install_as_peft(): Hugging Face PEFT is already imported in this process ({where}); "
                           "its classes cannot be replaced under the objects that hold them. Call "
                           "peftkit.install_as_peft() before anything imports peft (transformers' "
                           "TrainingArguments and Trainer, TRL and lm-eval do), at the top of the program.")
    early = sorted(name for name in sys.modules
                   if any(name == m or name.startswith(m + ".") for m in _DECIDED_AT_IMPORT))
    if early:
        raise PeftkitError(f"install_as_peft(): {', '.join(early[:4])}{' ...' if len(early) > 4 else ''} was "
                           "imported before the call and has already looked for peft. Call "
                           "peftkit.install_as_peft() at the top of the program, before importing transformers' "
                           "Trainer, TRL's trainers or lm-eval's models.")
    sys.meta_path.insert(0, _PeftFinder())
    importlib.invalidate_caches()


__all__ = ["PEFT_API_VERSION", "install_as_peft", "is_installed_as_peft"]
