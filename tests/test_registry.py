"""The method registry: a method added as one folder (tests/example_method, an output shift) runs the
whole property battery, saves and loads through its config, shows up in the toolkit, and the registry
refuses inconsistent records. The example is registered into a copy of the registry for each test,
so other tests never see it."""

from __future__ import annotations

import importlib
import json
import os

import pytest
import torch

from peftkit import ConfigError, PeftConfig, PeftModel, get_peft_model, registry
from peftkit.registry import Method, register_method

from . import adapter_battery as B
from .models import MLP

CONFIGS = {"mlp": dict(target_modules=["lin0", "lin1"]), "bert": dict(target_modules=["query", "value"])}


@pytest.fixture(autouse=True)
def shift(monkeypatch):
    """Register the example method (its folder's __init__ runs again) into a copy of the registry."""
    monkeypatch.setattr(registry, "_METHODS", dict(registry.all_methods()))
    from . import example_method

    return importlib.reload(example_method)


def _config(case):
    if case.name not in CONFIGS:
        return None  # the shift needs nn.Linear layers with a bias
    from .example_method import ShiftConfig

    return ShiftConfig(task_type=case.task_type, **CONFIGS[case.name])


SPEC = B.Spec("shift", _config, markers=(".shift.",))
CASES = B.case_params(["mlp", "bert"])


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("check", [B.check_noop_start, B.check_only_adapter_trains, B.check_merge, B.check_disable,
                                   B.check_several_adapters, B.check_mixed_batch],
                         ids=lambda f: f.__name__)
def test_battery(case, check):
    check(SPEC, case)


@pytest.mark.parametrize("case", CASES)
def test_save_load_through_the_registry(case, tmp_path):
    saved = B.check_save_load(SPEC, case, tmp_path)
    assert all(k.endswith(".shift") or "classifier" in k for k in saved)
    with open(os.path.join(tmp_path, "adapter_config.json")) as fh:
        assert json.load(fh)["peft_type"] == "SHIFT"
    assert type(PeftConfig.from_pretrained(tmp_path)).__name__ == "ShiftConfig"
    B.check_load_validates_shapes(SPEC, case, tmp_path / "bad")


def test_the_math(shift):
    torch.manual_seed(0)
    base = MLP()
    x = torch.randn(4, 10)
    pm = get_peft_model(base, shift.ShiftConfig(target_modules=["lin2"]))
    delta = torch.tensor([0.5, -2.0])
    with torch.no_grad():
        pm.base_model.model.lin2.shift["default"].copy_(delta)
        with pm.disable_adapter():
            plain = pm(x)
        torch.testing.assert_close(pm(x), plain + delta)


def test_a_registered_method_is_a_toolkit_method(shift):
    from peftkit.train.modeling import build_peft_config, method_names

    assert method_names()["shift"][0] is shift.ShiftConfig
    config = build_peft_config("shift", {"target_modules": ["lin0"]}, None)
    assert isinstance(config, shift.ShiftConfig)
    assert isinstance(get_peft_model(MLP(), config), PeftModel)


def test_the_registry_refuses_inconsistent_records(shift):
    from peftkit import LoraConfig

    with pytest.raises(ConfigError, match="already registered"):
        register_method(Method(peft_type="SHIFT", config_cls=LoraConfig, make_layer=shift.make_layer))
    with pytest.raises(ConfigError, match="exactly one"):
        register_method(Method(peft_type="NOTHING", config_cls=shift.ShiftConfig))
    with pytest.raises(ConfigError, match="Unknown peft_type"):
        PeftConfig.from_dict({"peft_type": "NOT_A_METHOD"})
