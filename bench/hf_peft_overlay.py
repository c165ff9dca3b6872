"""pytest plugin: run Hugging Face PEFT's own test suite against peftkit through an import overlay.

Loaded with ``-p hf_peft_overlay`` (see bench/hf_peft_suite.py). Every ``peft`` module that is imported
gets each name that peftkit also offers replaced by peftkit's object: a name exported by ``peftkit`` at
top level, or the same name in the peftkit module at the same dotted path (``peft.tuners.lora`` ->
``peftkit.tuners.lora``). What peftkit lacks stays PEFT's, so the test files import; tests of methods
peftkit does not implement are deselected (their config class name appears in the test id or file).
"""

from __future__ import annotations

import importlib
import os
import sys

import peftkit

_DONE: set[str] = set()


def _kit_module(name: str):
    kit = "peftkit" + name[len("peft"):]
    try:
        return importlib.import_module(kit)
    except ImportError:
        return None


def _overlay_module(mod) -> None:
    name = mod.__name__
    kit = _kit_module(name)
    for attr in list(vars(mod)):
        if attr.startswith("__"):
            continue
        value = None
        if kit is not None and hasattr(kit, attr) and not attr.startswith("_"):
            value = getattr(kit, attr)
        elif attr in getattr(peftkit, "__all__", ()) or (not attr.startswith("_") and hasattr(peftkit, attr)
                                                        and not isinstance(getattr(peftkit, attr), type(sys))):
            value = getattr(peftkit, attr)
        if value is not None and not isinstance(value, type(sys)):
            setattr(mod, attr, value)
    if kit is not None:
        for attr in dir(kit):
            if not attr.startswith("_") and not hasattr(mod, attr):
                setattr(mod, attr, getattr(kit, attr))


_BUSY: list[bool] = []


def overlay() -> None:
    if _BUSY:
        return
    _BUSY.append(True)
    try:
        import peft  # noqa: F401

        for name, mod in list(sys.modules.items()):
            initializing = getattr(getattr(mod, "__spec__", None), "_initializing", False)
            if (name == "peft" or name.startswith("peft.")) and name not in _DONE and mod is not None and not initializing:
                _DONE.add(name)
                _overlay_module(mod)
    finally:
        _BUSY.clear()


def pytest_configure(config):
    if os.environ.get("PEFTKIT_OVERLAY_OFF"):
        return
    overlay()
    import builtins

    real_import = builtins.__import__

    def hooked(name, globals=None, locals=None, fromlist=(), level=0):
        out = real_import(name, globals, locals, fromlist, level)
        if name.startswith("peft") and not name.startswith("peftkit"):
            overlay()
        return out

    builtins.__import__ = hooked


UNIMPLEMENTED_HINTS = (
    "AdaLora", "Adamss", "AdaptionPrompt", "Arrow", "Bone", "Boft", "BOFT", "C3A", "Cartridge", "CPT", "Deft",
    "Delora", "DeLoRA", "Fourierft", "FourierFT", "Frod", "GraLora", "Hira", "HRA", "Loha", "LoHa", "Lokr",
    "LoKr", "MiSS", "MultitaskPromptTuning", "OFT", "Oft", "OSF", "Osf", "Poly", "Pvera", "PVeRA",
    "RandLora", "RoadConfig", "Shira", "SHiRA", "Vblora", "VBLoRA", "VeRA", "Vera", "Xlora", "XLora",
    "Unilora", "UniLora", "Velora", "Lily", "Monteclora", "BdLora", "Waveft", "WaveFT", "Gralora", "Tinylora",
    "Shadow", "Supertuning", "Loraga", "LoraGA", "Corda", "CorDA", "EvaConfig", "EVA", "Lorafa", "LoRAFA", "Psoft",
    "Kasa", "Road", "Randlora", "Hra",
)


def _unimplemented(nodeid: str) -> bool:
    return any(h in nodeid for h in UNIMPLEMENTED_HINTS)


def pytest_collection_modifyitems(config, items):
    keep, drop = [], []
    for item in items:
        (drop if _unimplemented(item.nodeid) else keep).append(item)
    if drop:
        config.hook.pytest_deselected(items=drop)
        items[:] = keep
