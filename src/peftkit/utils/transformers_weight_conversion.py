"""Hugging Face PEFT's ``peft.utils.transformers_weight_conversion`` import path: the key renamings
transformers' ``PreTrainedModel.load_adapter`` applies to an adapter file.

An adapter file names tensors ``base_model.model.<module>.lora_A.weight``; on a transformers model with
adapters injected (no PeftModel around it) the tensor is ``<module>.lora_A.<adapter>.weight``.
:func:`build_peft_weight_mapping` turns the model's own key renamings (``get_model_conversion_mapping``)
into ones for its adapter keys. transformers' fused-expert converters (per-expert checkpoints of v4 MoE
models merged into one tensor) are not carried over: an adapter over such experts is loaded with
``peftkit.PeftModel.from_pretrained``, whose ``target_parameters`` layout needs no conversion.
"""

from __future__ import annotations

import re
from typing import Any, Optional

from ..mapping import PEFT_TYPE_TO_PREFIX_MAPPING


def build_peft_weight_mapping(weight_conversions: Optional[list[Any]], adapter_name: str,
                              peft_config: Any = None) -> list[Any]:
    """transformers ``WeightRenaming`` rules taking an adapter file's keys to the model's in-memory keys.

    ``weight_conversions``: the model's rules (an empty list or None: the model needs none, and neither
    does its adapter). ``peft_config``: the adapter's config, whose method decides the tensor prefix
    (``lora_``, ``ia3_``, ...); without it every method's prefix is renamed.
    """
    if not weight_conversions:
        return []
    from transformers.core_model_loading import WeightRenaming

    rules = [WeightRenaming("base_model.model.model.", "model."), WeightRenaming("base_model.model.", "")]
    peft_type = getattr(peft_config, "peft_type", None)
    prefixes = ({PEFT_TYPE_TO_PREFIX_MAPPING[peft_type]} if peft_type in PEFT_TYPE_TO_PREFIX_MAPPING
                else set(PEFT_TYPE_TO_PREFIX_MAPPING.values()))
    for prefix in sorted(prefixes):
        # lora_A.weight -> lora_A.<adapter>.weight
        rules.append(WeightRenaming(source_patterns=rf"({re.escape(prefix)}[^\.]*)",
                                    target_patterns=rf"\1.{adapter_name}"))
    rules += [rule for rule in weight_conversions if isinstance(rule, WeightRenaming)]
    return rules


__all__ = ["build_peft_weight_mapping"]
