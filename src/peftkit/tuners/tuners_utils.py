"""Hugging Face PEFT's ``peft.tuners.tuners_utils`` import path: ``BaseTuner`` (peftkit's
:class:`~peftkit.tuner.BaseTuner`), ``BaseTunerLayer`` (the adapter-layer protocol),
``check_target_module_exists``.

``isinstance(module, BaseTunerLayer)`` holds, as in PEFT, for the layers that carry an adapter
(LoRA, IA3, LN tuning, trainable tokens, bottleneck adapters: peftkit's
:class:`~peftkit.core.layer.AdapterLayer`), and not for :class:`~peftkit.utils.ModulesToSaveWrapper`,
which in PEFT is an ``AuxiliaryTrainingWrapper`` beside the tuner layers. Tools rely on the
difference: TRL refuses a ``lm_head`` that is a ``BaseTunerLayer`` (its loss reads ``lm_head.weight``)
but trains one in ``modules_to_save``. peftkit's ``TrainableTokensWrapper`` stays a ``BaseTunerLayer``:
it is also the layer PEFT keeps one level down (``token_adapter``), which ``set_adapter`` /
``disable_adapters`` of transformers reach that way.
"""

from ..core.layer import AdapterLayer
from ..core.modules_to_save import ModulesToSaveWrapper
from ..core.targets import check_target_module_exists
from ..tuner import BaseTuner


class _BaseTunerLayerMeta(type):
    def __instancecheck__(cls, obj: object) -> bool:
        if cls is BaseTunerLayer:
            return isinstance(obj, AdapterLayer) and not isinstance(obj, ModulesToSaveWrapper)
        return super().__instancecheck__(obj)

    def __subclasscheck__(cls, sub: type) -> bool:
        if cls is BaseTunerLayer:
            return isinstance(sub, type) and issubclass(sub, AdapterLayer) and not issubclass(sub, ModulesToSaveWrapper)
        return super().__subclasscheck__(sub)


class BaseTunerLayer(AdapterLayer, metaclass=_BaseTunerLayerMeta):
    """Hugging Face PEFT's ``BaseTunerLayer``: ``isinstance`` / ``issubclass`` answer for every peftkit
    adapter layer but :class:`~peftkit.utils.ModulesToSaveWrapper` (see the module docstring)."""


__all__ = ["BaseTuner", "BaseTunerLayer", "check_target_module_exists"]
