"""Print docs/compat.md's table of Hugging Face PEFT's public API: every name ``peft`` and ``peft.utils``
export, with peftkit's status (same / different / missing). Needs Hugging Face PEFT installed (a test
dependency). ``python bench/compat_table.py > /tmp/table.md`` and paste it into docs/compat.md.

A name counts as *same* when peftkit exports it at the same import path (``peftkit.X`` for
``peft.X``); DIFFERENT lists the names that exist with a deliberate difference (the note says which),
REASONS why a name is missing. Names of methods peftkit does not implement are summed up in one row.
"""

from __future__ import annotations

import inspect

import peft
import peft.utils

import peftkit
import peftkit.utils

DIFFERENT = {
    "PeftModel": "`base_model` is the tuner (`LoraModel`, ...) whose operations forward to the PeftModel; a tuner "
                 "cannot be built on its own (`LoraModel(model, config, name)`)",
    "LoraModel": "made by a PeftModel only (`get_peft_model` / `inject_adapter_in_model`), not constructible alone",
    "IA3Model": "made by a PeftModel only (as LoraModel)", "LNTuningModel": "made by a PeftModel only (as LoraModel)",
    "TrainableTokensModel": "made by a PeftModel only (as LoraModel)",
    "PeftMixedModel": "mixes LoRA adapters only (the one PEFT-mixable method peftkit implements)",
    "PeftType": "lists every PEFT method; a config of one peftkit does not implement is refused when read",
    "set_peft_model_state_dict": "a missing adapter tensor is an error by default (`strict=True`); PEFT warns",
    "PeftError": "= `PeftkitError` (a ValueError)", "PeftWarning": "= `PeftkitWarning` (a UserWarning)",
    "NoMatchingPeftModuleError": "= `TargetError`",
    "AuxiliaryTrainingWrapper": "= `ModulesToSaveWrapper`; `TrainableTokensWrapper` is not a subclass",
    "prepare_model_for_kbit_training": "also prepares peftkit's own int8/NF4 linears",
    "PrefixEncoder": "same weights and keys; the class takes (config) as PEFT's",
    "get_peft_model": "`mixed=True` gives a PeftMixedModel of LoRA adapters",
}
REASONS = {
    "LoftQConfig": "LoftQ init is not implemented", "replace_lora_weights_loftq": "LoftQ is not implemented",
    "EvaConfig": "EVA init is not implemented", "get_eva_state_dict": "EVA init is not implemented",
    "initialize_lora_eva_weights": "EVA init is not implemented", "LoraGAConfig": "LoRA-GA init is not implemented",
    "preprocess_loraga": "LoRA-GA init is not implemented", "ArrowConfig": "Arrow routing is not implemented",
    "create_arrow_model": "Arrow routing is not implemented", "BdLoraConfig": "block-diagonal LoRA is not implemented",
    "KasaConfig": "KaSA is not implemented", "VeloraConfig": "VeLoRA is not implemented",
    "MontecloraConfig": "MonteCLoRA is not implemented", "LoraRuntimeConfig": "ephemeral GPU offload is not implemented",
    "convert_to_lora": "conversion of other methods to LoRA: needs those methods",
    "save_as_lora": "conversion of other methods to LoRA: needs those methods",
    "find_kappa_target_modules": "a helper of an unimplemented method",
    "register_peft_method": "peftkit's registry takes a `Method` record (`peftkit.registry.register_method`)",
    "bloom_model_postprocess_past_key_value": "BLOOM's legacy cache layout; transformers 5 has no such models",
    "TRANSFORMERS_MODELS_TO_PREFIX_TUNING_POSTPROCESS_MAPPING": "BLOOM's legacy cache layout (see above)",
    "initialize_kv_prefix_from_past_key_values": "Cartridges (prefix initialised from a KV cache) are not implemented",
    "initialize_kv_prefix_from_text": "Cartridges are not implemented",
    "prompt_embeddings_from_past_key_values": "Cartridges are not implemented",
    "compose_cartridge_adapters": "Cartridges are not implemented", "CPTEmbedding": "CPT is not implemented",
    "CartridgeEncoder": "Cartridges are not implemented", "MultitaskPromptTuningInit": "multitask prompt tuning is not implemented",
    "ALLOWED_COMPUTE_DTYPES": "quantization-backend internals", "UPCAST_DTYPES": "quantization-backend internals",
    "get_gptqmodel_quant_linear": "GPTQ bases are not supported", "get_quantization_config": "quantization internals",
    "get_quantization_kwargs": "quantization internals", "resolve_quantization_backend": "quantization internals",
    "quantization_extra_repr": "quantization internals", "map_cache_to_layer_device_map": "multi-device KV-cache internals",
    "set_additional_trainable_modules": "internal of PeftModel; use `modules_to_save` / `trainable_token_indices`",
    "PEFT_TYPE_TO_MIXED_MODEL_MAPPING": "PeftMixedModel mixes LoRA only",
}


def _names(module) -> list[str]:
    return sorted(n for n in dir(module) if not n.startswith("_") and not inspect.ismodule(getattr(module, n)))


def _other_method(name: str) -> bool:
    """Config/Model/mapping of a method peftkit does not implement."""
    implemented = ("Lora", "LORA", "IA3", "LNTuning", "LNTUNING", "Prompt", "Prefix", "TrainableTokens", "Peft")
    if name.startswith("TRANSFORMERS_MODELS_TO_") and name.endswith("_TARGET_MODULES_MAPPING"):
        return not any(m in name for m in ("_LORA_", "_IA3_", "_LNTUNING_"))
    return name.endswith(("Config", "Model")) and not name.startswith(implemented) and name not in REASONS


def rows() -> list[tuple[str, str, str]]:
    out, others = [], []
    for path, mod, kit in (("peft", peft, peftkit), ("peft.utils", peft.utils, peftkit.utils)):
        for name in _names(mod):
            full = f"{path}.{name}"
            if hasattr(kit, name):
                out.append((full, "different" if name in DIFFERENT else "same", DIFFERENT.get(name, "")))
            elif _other_method(name):
                others.append(name)
            else:
                out.append((full, "missing", REASONS.get(name, "not implemented")))
    out.append((f"{len(others)} names of other methods", "missing",
                "methods peftkit does not implement yet: " + ", ".join(sorted(others))))
    return out


if __name__ == "__main__":
    print("| name | peftkit | note |\n|---|---|---|")
    for name, status, note in rows():
        print(f"| `{name}` | {status} | {note} |" if not name[0].isdigit() else f"| {name} | {status} | {note} |")
