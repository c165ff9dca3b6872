"""Scenarios of transformers' tests/peft_integration/test_peft_integration.py on the bundled model."""
import os

import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM, Trainer, TrainingArguments, logging, pipeline
from transformers.testing_utils import CaptureLogger

from common import IDS, base_model, has_tuner_layer, records, saved_lora_folder, tokenizer

CLASSES = [AutoModelForCausalLM, LlamaForCausalLM]


@pytest.mark.parametrize("cls", CLASSES)
def test_peft_from_pretrained(tmp_path, cls):
    _, ref = saved_lora_folder(tmp_path)
    logger = logging.get_logger("transformers.integrations.peft")
    with CaptureLogger(logger) as cl:
        model = cls.from_pretrained(tmp_path)
    assert "unexpected keys" not in cl.out and "missing keys" not in cl.out
    assert has_tuner_layer(model) and model._hf_peft_config_loaded
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref)
    model.generate(input_ids=IDS, max_new_tokens=3)


@pytest.mark.parametrize("cls", CLASSES)
def test_peft_state_dict(tmp_path, cls):
    pm, _ = saved_lora_folder(tmp_path)
    model = cls.from_pretrained(tmp_path)
    sd = model.get_adapter_state_dict()
    assert sd and all("lora" in k for k in sd)
    from peft import get_peft_model_state_dict
    ref = get_peft_model_state_dict(pm)
    assert sorted(k.removeprefix("base_model.model.") for k in ref) == sorted(sd)
    for k, v in ref.items():
        torch.testing.assert_close(sd[k.removeprefix("base_model.model.")], v)


@pytest.mark.parametrize("cls", CLASSES)
def test_peft_save_pretrained(tmp_path, cls):
    saved_lora_folder(tmp_path / "a")
    model = cls.from_pretrained(tmp_path / "a")
    with torch.no_grad():
        ref = model(IDS).logits
    out = tmp_path / "b"
    model.save_pretrained(out)
    files = os.listdir(out)
    assert "adapter_model.safetensors" in files and "adapter_config.json" in files
    assert "config.json" not in files and "model.safetensors" not in files and "pytorch_model.bin" not in files
    again = cls.from_pretrained(out)
    assert has_tuner_layer(again)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, ref)
    model.save_pretrained(tmp_path / "c")  # transformers 5: safetensors only
    again = cls.from_pretrained(tmp_path / "c")
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, ref)


@pytest.mark.parametrize("cls", CLASSES)
def test_peft_enable_disable_adapters(cls):
    from peft import LoraConfig
    model = cls.from_pretrained(common_dir())
    with torch.no_grad():
        base = model(IDS).logits
    model.add_adapter(LoraConfig(init_lora_weights=False))
    with torch.no_grad():
        on = model(IDS).logits
        model.disable_adapters()
        off = model(IDS).logits
        model.enable_adapters()
        on2 = model(IDS).logits
    torch.testing.assert_close(on, on2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(off, base)
    assert not torch.allclose(on, off, atol=1e-6, rtol=1e-6)


def common_dir():
    from common import MODEL_DIR
    return MODEL_DIR


@pytest.mark.parametrize("cls", CLASSES)
def test_peft_add_adapter_and_from_pretrained(tmp_path, cls):
    from peft import LoraConfig
    model = cls.from_pretrained(common_dir())
    model.add_adapter(LoraConfig(init_lora_weights=False))
    assert has_tuner_layer(model)
    model.generate(input_ids=IDS, max_new_tokens=3)
    with torch.no_grad():
        ref = model(IDS).logits
    model.save_pretrained(tmp_path)
    again = cls.from_pretrained(tmp_path)
    assert has_tuner_layer(again)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, ref)


def test_peft_add_adapter_modules_to_save():
    from peft import LoraConfig
    from peft.utils import ModulesToSaveWrapper
    model = base_model()
    model.add_adapter(LoraConfig(init_lora_weights=False, modules_to_save=["lm_head"]))
    wrappers = [(n, m) for n, m in model.named_modules() if isinstance(m, ModulesToSaveWrapper)]
    assert wrappers and "lm_head" in wrappers[0][0]
    assert wrappers[0][1].modules_to_save.default.weight.requires_grad
    sd = model.get_adapter_state_dict()
    assert "lm_head.weight" in sd
    model(IDS).logits.mean().backward()
    for _, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None


def test_peft_add_adapter_training_gradient_checkpointing():
    from peft import LoraConfig
    model = base_model()
    model.add_adapter(LoraConfig(init_lora_weights=False))
    assert model.get_input_embeddings()(IDS).requires_grad is False
    model.gradient_checkpointing_enable()
    model.train()
    assert model.get_input_embeddings()(IDS).requires_grad is True
    for n, p in model.named_parameters():
        if "lora" in n.lower():
            assert p.requires_grad
    model(IDS).logits.mean().backward()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert "lora" in n.lower() and p.grad is not None


def test_peft_add_multi_adapter(tmp_path):
    from peft import LoraConfig
    model = base_model()
    with torch.no_grad():
        orig = model(IDS).logits
    torch.manual_seed(0)
    model.add_adapter(LoraConfig(init_lora_weights=False))
    with torch.no_grad():
        l1 = model(IDS).logits
    model.add_adapter(LoraConfig(init_lora_weights=False), adapter_name="adapter-2")
    with torch.no_grad():
        l2 = model(IDS).logits
    model.generate(input_ids=IDS, max_new_tokens=3)
    model.set_adapter("default")
    assert model.active_adapters() == ["default"]
    model.set_adapter("adapter-2")
    assert model.active_adapters() == ["adapter-2"]
    assert not torch.allclose(l1, l2, atol=1e-6) and not torch.allclose(orig, l2, atol=1e-6)
    model.set_adapter(["adapter-2", "default"])
    assert model.active_adapters() == ["adapter-2", "default"]
    with torch.no_grad():
        mixed = model(IDS).logits
    assert not torch.allclose(l1, mixed, atol=1e-6) and not torch.allclose(l2, mixed, atol=1e-6)
    with pytest.raises(ValueError):
        model.save_pretrained(tmp_path)


def test_delete_adapter():
    from peft import LoraConfig
    model = base_model()
    with torch.no_grad():
        orig = model(IDS).logits
    c1, c2 = LoraConfig(init_lora_weights=False), LoraConfig(init_lora_weights=False)
    model.add_adapter(c1, adapter_name="adapter_1")
    model.add_adapter(c2, adapter_name="adapter_2")
    assert "adapter_1" in model.peft_config and "adapter_2" in model.peft_config
    model.delete_adapter("adapter_1")
    assert "adapter_1" not in model.peft_config and "adapter_2" in model.peft_config
    model.delete_adapter("adapter_2")
    assert "adapter_2" not in getattr(model, "peft_config", {}) and not model._hf_peft_config_loaded
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, orig)
    model.add_adapter(c1, adapter_name="adapter_1")
    model.add_adapter(c2, adapter_name="adapter_2")
    model.delete_adapter(["adapter_1", "adapter_2"])
    assert not model._hf_peft_config_loaded
    model.add_adapter(c1, adapter_name="adapter_3")
    with pytest.raises(ValueError, match=r"The following adapter\(s\) are not present"):
        model.delete_adapter("nonexistent_adapter")
    with pytest.raises(ValueError, match=r"The following adapter\(s\) are not present"):
        model.delete_adapter(["adapter_1", "nonexistent_adapter"])
    model.add_adapter(c1, adapter_name="adapter_1")
    model.add_adapter(c2, adapter_name="adapter_2")
    model.delete_adapter([])
    # model.delete_adapter(None): transformers 5.23 raises TypeError itself (with real PEFT too)
    assert "adapter_1" in model.peft_config and "adapter_2" in model.peft_config
    model.delete_adapter(["adapter_1", "adapter_1"])
    assert "adapter_1" not in model.peft_config and "adapter_2" in model.peft_config


def _state_dict_of(folder):
    from safetensors.torch import load_file
    return load_file(os.path.join(folder, "adapter_model.safetensors"))


def test_peft_load_adapter_with_state_dict(tmp_path):
    from peft import LoraConfig
    _, ref = saved_lora_folder(tmp_path)
    model = base_model()
    with pytest.raises(ValueError):
        model.load_adapter(peft_model_id=None)
    sd = _state_dict_of(tmp_path)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model.load_adapter(adapter_state_dict=sd, peft_config=cfg)
    assert has_tuner_layer(model)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref)
    with pytest.raises(ValueError):
        model.load_adapter(adapter_state_dict=sd, peft_config=None)
    model.generate(input_ids=IDS, max_new_tokens=3)


def test_peft_load_adapter_state_dict_low_cpu_mem_usage(tmp_path):
    from peft import LoraConfig
    _, ref = saved_lora_folder(tmp_path)
    sd = _state_dict_of(tmp_path)
    model = base_model()
    cfg = dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    model.load_adapter(adapter_state_dict=sd, peft_config=LoraConfig(**cfg), low_cpu_mem_usage=False)
    model.load_adapter(adapter_state_dict=sd, adapter_name="other", peft_config=LoraConfig(**cfg),
                       low_cpu_mem_usage=True)
    assert not any(p.device.type == "meta" for p in model.parameters())
    model.set_adapter("other")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref)


def test_peft_load_adapter_unexpected_keys_warning(tmp_path):
    from peft import LoraConfig
    saved_lora_folder(tmp_path)
    sd = _state_dict_of(tmp_path)
    sd["foobar"] = next(iter(sd.values()))
    model = base_model()
    logger = logging.get_logger("transformers.integrations.peft")
    with CaptureLogger(logger) as cl:
        info = model.load_adapter(adapter_state_dict=sd, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert "foobar" in str(info.unexpected_keys) or "foobar" in cl.out


def test_peft_load_adapter_missing_keys_warning(tmp_path):
    from peft import LoraConfig
    saved_lora_folder(tmp_path)
    sd = _state_dict_of(tmp_path)
    key = next(iter(sd))
    del sd[key]
    model = base_model()
    info = model.load_adapter(adapter_state_dict=sd, peft_config=LoraConfig(r=4, target_modules=["q_proj", "v_proj"]),
                              adapter_name="other")
    key = key[len("base_model.model."):]
    prefix, _, suffix = key.rpartition(".")
    assert f"{prefix}.other.{suffix}" in info.missing_keys


@pytest.mark.parametrize("is_trainable", [False, True])
def test_peft_load_adapter_training_inference_mode(tmp_path, is_trainable):
    saved_lora_folder(tmp_path)
    model = base_model()
    model.load_adapter(str(tmp_path), is_trainable=is_trainable)
    lora = [p for n, p in model.named_parameters() if "lora" in n]
    assert lora and all(p.requires_grad == is_trainable for p in lora)
    assert model.peft_config["default"].inference_mode == (not is_trainable)
    assert model.training == is_trainable or is_trainable


def test_peft_pipeline(tmp_path):
    saved_lora_folder(tmp_path)
    tok = tokenizer()
    pipe = pipeline("text-generation", model=str(tmp_path), tokenizer=tok)
    base_pipe = pipeline("text-generation", model=common_dir(), tokenizer=tok)
    assert len(list(pipe.model.parameters())) != len(list(base_pipe.model.parameters()))
    out = pipe("Once upon a time", max_new_tokens=4)
    assert out[0]["generated_text"].startswith("Once upon a time")


def test_peft_hotswap(tmp_path):
    _, ref_a = saved_lora_folder(tmp_path / "a", seed=1)
    _, ref_b = saved_lora_folder(tmp_path / "b", seed=2)
    model = base_model()
    model.load_adapter(str(tmp_path / "a"), adapter_name="x")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref_a)
    model.load_adapter(str(tmp_path / "b"), adapter_name="x", hotswap=True)
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref_b)
    with pytest.raises(ValueError):
        model.load_adapter(str(tmp_path / "b"), adapter_name="nope", hotswap=True)


def test_peft_enable_hotswap(tmp_path):
    # (with different ranks this fails with real PEFT too: transformers 5.23 never calls
    # prepare_model_for_compiled_hotswap, so it is not a scenario here)
    _, ref_a = saved_lora_folder(tmp_path / "a", seed=1, r=4)
    _, ref_b = saved_lora_folder(tmp_path / "b", seed=2, r=4)
    model = base_model()
    model.enable_peft_hotswap(target_rank=8)
    model.load_adapter(str(tmp_path / "a"), adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref_a)
    model.load_adapter(str(tmp_path / "b"), adapter_name="default")
    with torch.no_grad():
        torch.testing.assert_close(model(IDS).logits, ref_b)


def test_peft_add_ia3_adapter(tmp_path):
    from peft import IA3Config
    model = base_model()
    with torch.no_grad():
        orig = model(IDS).logits
    model.add_adapter(IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"],
                                init_ia3_weights=False))
    with torch.no_grad():
        ref = model(IDS).logits
    assert not torch.allclose(ref, orig)
    model.save_pretrained(tmp_path)
    again = AutoModelForCausalLM.from_pretrained(tmp_path)
    with torch.no_grad():
        torch.testing.assert_close(again(IDS).logits, ref)


def test_peft_trainer_with_add_adapter(tmp_path):
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import DataCollatorForLanguageModeling
    tok = tokenizer()
    model = base_model()
    model.add_adapter(LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    data = Dataset.from_list([tok(r["source"] + " " + r["target"], truncation=True, max_length=32)
                              for r in records(16)])
    before = {k: v.clone() for k, v in model.get_adapter_state_dict().items()}
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora" not in n}
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, learning_rate=1e-2,
                             report_to=[], use_cpu=True, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data,
                      data_collator=DataCollatorForLanguageModeling(tok, mlm=False))
    trainer.train()
    after = model.get_adapter_state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before if "lora_B" in k)
    for n, p in model.named_parameters():
        if "lora" not in n:
            assert torch.equal(p, base_before[n]), n
    trainer.save_model(str(tmp_path / "final"))
    assert "adapter_config.json" in os.listdir(tmp_path / "final")
