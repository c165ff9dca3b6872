"""An example method added the way every method is added (see docs/architecture.md, "Adding a method").

A real method is this folder under ``src/peftkit/methods/`` plus one line in
``src/peftkit/methods/__init__.py`` (``from . import shift``), a ``PeftType`` member and an export in
``peftkit/__init__.py``. This one lives among the tests, so it uses a plain string as its
``peft_type`` and registers when its test imports it (tests/test_registry.py).
"""

from peftkit.registry import Method, register_method

from .config import ShiftConfig
from .layer import ShiftLayer, make_layer

register_method(Method(peft_type="SHIFT", config_cls=ShiftConfig, layer_types=(ShiftLayer,), make_layer=make_layer))

__all__ = ["ShiftConfig", "ShiftLayer", "make_layer"]
