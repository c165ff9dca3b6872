"""peftkit inside the tools people train and evaluate with: transformers' Trainer and adapter API, TRL
(SFT, DPO, GRPO), accelerate, lm-eval (docs/integrations.md; Lightning: test_integration_lightning.py).

Tools that decide by ``isinstance(model, peft.PeftModel)`` run with ``peftkit.install_as_peft()`` in a
process of their own (tests/as_peft_cases.py): this process imports Hugging Face PEFT for the interop
checks. Each such process reports which ``peft`` it imported; the real package must never be among them.
Every saved artefact is checked here: an adapter folder that loads in peftkit and in Hugging Face PEFT
with equal logits, different from the base model's.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import peftkit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = os.path.join(ROOT, "tests", "as_peft_cases.py")
ENV = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
           TOKENIZERS_PARALLELISM="false")
IDS = torch.tensor([[1, 5, 9, 20, 33, 7, 2, 11]])  # as in as_peft_cases.py


def run_case(name: str, out, arg: str = "-") -> dict:
    os.makedirs(out, exist_ok=True)
    proc = subprocess.run([sys.executable, CASES, name, str(out), str(arg)], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(out, "result.json"), encoding="utf-8") as f:
        result = json.load(f)
    assert result["peft_is_peftkit"] and result["real_peft_modules"] == []
    return result


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, cwd=ROOT,
                          env=ENV, timeout=300)


def base_logits() -> torch.Tensor:
    model, _ = peftkit.load_model()
    with torch.no_grad():
        return model(IDS).logits


def check_adapter_folder(folder) -> torch.Tensor:
    """The folder is an adapter (no base weights) that loads in peftkit and in Hugging Face PEFT with equal
    logits that differ from the base model's; returns those logits."""
    files = set(os.listdir(folder))
    assert {"adapter_config.json", "adapter_model.safetensors"} <= files, files
    assert not files & {"model.safetensors", "pytorch_model.bin"}, files
    kit = peftkit.PeftModel.from_pretrained(peftkit.load_model()[0], str(folder))
    with torch.no_grad():
        kit_logits = kit(IDS).logits
    assert (kit_logits - base_logits()).abs().max() > 1e-3  # the trained adapter does something
    peft = pytest.importorskip("peft")
    hf = peft.PeftModel.from_pretrained(peftkit.load_model()[0], str(folder))
    with torch.no_grad():
        torch.testing.assert_close(hf(IDS).logits, kit_logits)
    return kit_logits


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_adapter")
    run_case("sft", out, "model")
    return out / "adapter"


# -- install_as_peft ----------------------------------------------------------------------------


def test_peft_is_not_replaced_unless_asked():
    pytest.importorskip("peft")
    proc = python("""
        import peftkit, peft
        assert peft.PeftModel is not peftkit.PeftModel and "site-packages" in peft.__file__
        assert not peftkit.is_installed_as_peft()
    """)
    assert proc.returncode == 0, proc.stderr


def test_install_as_peft_answers_imports_and_metadata():
    proc = python("""
        import importlib.metadata, sys
        import peftkit
        peftkit.install_as_peft()
        peftkit.install_as_peft()  # idempotent
        import peft
        from peft import LoraConfig, PeftModel, get_peft_model
        from peft.tuners.lora import LoraLayer
        from peft.tuners.tuners_utils import BaseTunerLayer
        from peft.utils.other import AuxiliaryTrainingWrapper
        import peft.functional
        assert PeftModel is peftkit.PeftModel and LoraConfig is peftkit.LoraConfig
        assert get_peft_model is peftkit.get_peft_model and issubclass(LoraLayer, BaseTunerLayer)
        assert peft.__version__ == peftkit.PEFT_API_VERSION == importlib.metadata.version("peft")
        assert "peftkit" in importlib.metadata.metadata("peft")["Summary"]
        try:
            import peft.not_a_module
        except ModuleNotFoundError as exc:
            assert "peft.not_a_module" in str(exc)
        else:
            raise AssertionError("peft.not_a_module imported")
        try:
            peft.not_a_name
        except AttributeError as exc:
            assert "not_a_name" in str(exc) and "installed as peft" in str(exc)
        from transformers.utils import is_peft_available
        from accelerate.utils import is_peft_available as accelerate_sees_peft
        assert is_peft_available() and accelerate_sees_peft()
        real = [n for n, m in sys.modules.items() if n.split(".")[0] == "peft" and "site-packages" in
                str(getattr(m, "__file__", "") or "")]
        assert real == [], real
        print("ok")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


def test_install_as_peft_refuses_once_real_peft_is_imported():
    pytest.importorskip("peft")
    proc = python("""
        import sys
        import peft, peftkit
        meta_path = list(sys.meta_path)
        try:
            peftkit.install_as_peft()
        except peftkit.PeftkitError as exc:
            assert "already imported" in str(exc) and sys.meta_path == meta_path
            assert not peftkit.is_installed_as_peft() and sys.modules["peft"] is peft
            print("refused")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", proc.stderr


def test_install_as_peft_refuses_after_a_tool_looked_for_peft():
    # without Hugging Face PEFT installed, `import transformers.trainer` records "no peft" and imports nothing
    # of it; a module standing in for it (so that the installed PEFT is not imported) is enough
    proc = python("""
        import sys, types
        import peftkit
        sys.modules["transformers.trainer"] = types.ModuleType("transformers.trainer")
        try:
            peftkit.install_as_peft()
        except peftkit.PeftkitError as exc:
            assert "transformers.trainer" in str(exc) and "before" in str(exc), exc
            assert not peftkit.is_installed_as_peft()
            print("refused")
    """)
    assert proc.returncode == 0 and proc.stdout.strip() == "refused", proc.stderr


def test_as_peft_command_reaches_the_processes_a_tool_starts(tmp_path):
    script = tmp_path / "tool.py"
    script.write_text(textwrap.dedent("""
        import subprocess, sys
        import peft, peftkit
        child = "import peft, peftkit; print(peft.PeftModel is peftkit.PeftModel)"
        out = subprocess.run([sys.executable, "-c", child], capture_output=True, text=True, check=True).stdout
        print(peft.PeftModel is peftkit.PeftModel, out.strip(), sys.argv[1:])
        sys.exit(3)
    """))
    proc = subprocess.run([sys.executable, "-m", "peftkit", "as-peft", str(script), "--flag"], capture_output=True,
                          text=True, cwd=ROOT, env=ENV, timeout=300)
    assert proc.returncode == 3, proc.stderr  # the tool's own exit status
    assert proc.stdout.split() == ["True", "True", "['--flag']"], proc.stdout
    missing = subprocess.run([sys.executable, "-m", "peftkit", "as-peft", "no-such-tool"], capture_output=True,
                             text=True, cwd=ROOT, env=ENV, timeout=300)
    assert missing.returncode == 2 and "not a Python console command" in missing.stderr


# -- TRL ----------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trl_command_line_through_as_peft(tmp_path):
    pytest.importorskip("trl")
    data = tmp_path / "data"
    data.mkdir()
    with open(peftkit.model_path().parent / "data" / "e2e_nlg_train.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:16]
    (data / "train.jsonl").write_text("".join(json.dumps({"prompt": r["source"] + "\n", "completion": r["target"]})
                                              + "\n" for r in rows))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "peftkit", "as-peft", "trl", "sft", "--model_name_or_path", str(peftkit.model_path()),
           "--dataset_name", str(data), "--use_peft", "--lora_r", "4", "--lora_alpha", "8", "--max_steps", "4",
           "--per_device_train_batch_size", "4", "--learning_rate", "1e-2", "--output_dir", str(out), "--use_cpu",
           "--report_to", "none", "--max_length", "64", "--save_strategy", "no"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    check_adapter_folder(out)


@pytest.mark.slow
@pytest.mark.parametrize("given", ["model", "config"])
def test_trl_sft_trains_a_peftkit_lora(tmp_path, given):
    pytest.importorskip("trl")
    result = run_case("sft", tmp_path, given)
    assert result["model_class"] == "peftkit.model.PeftModelForCausalLM"
    assert result["losses"][-1] < 0.6 * result["losses"][0]
    assert len(result["changed"]) == result["n_tensors"] > 0
    check_adapter_folder(tmp_path / "adapter")


@pytest.mark.slow
@pytest.mark.parametrize("given", ["model", "config"])
def test_trl_dpo_uses_the_adapter_less_model_as_reference(tmp_path, given):
    pytest.importorskip("trl")
    result = run_case("dpo", tmp_path, given)
    assert result["losses"][0] == pytest.approx(0.6931, abs=1e-3)  # policy == reference at the start
    assert result["losses"][-1] < 0.5 and result["margins"][-1] > 1.0
    assert len(result["changed"]) == result["n_tensors"] > 0
    assert not result["ref_model"] and result["base_changed"] == []  # no second model; the base stays frozen
    base_params = sum(p.numel() for p in peftkit.load_model()[0].parameters())
    assert result["parameters"] < 1.1 * base_params  # one base in memory, not two
    if given == "config":  # the reference is the model with its adapter disabled (disable_adapter())
        assert result["adapters"] == ["default"]
    else:  # TRL copies a given adapter to a frozen "ref" adapter (its choice; a few KB, not a model)
        assert result["adapters"] == ["default", "ref"] and result["ref_adapter_changed"] == []
    check_adapter_folder(tmp_path / "adapter")


@pytest.mark.slow
def test_trl_grpo_trains_a_peftkit_lora(tmp_path):
    pytest.importorskip("trl")
    result = run_case("grpo", tmp_path, "config")
    assert all(g > 0 for g in result["grad_norms"])
    assert len(result["changed"]) == result["n_tensors"] > 0
    check_adapter_folder(tmp_path / "adapter")


# -- transformers -------------------------------------------------------------------------------


@pytest.mark.slow
def test_transformers_trainer_checkpoints_best_model_and_resume(tmp_path):
    result = run_case("hf_trainer", tmp_path)
    assert result["losses"][-1] < result["losses"][0]
    assert len(result["changed"]) == result["n_tensors"] > 0
    assert list(result["checkpoints"]) == ["checkpoint-2", "checkpoint-4", "checkpoint-6"]
    for files in result["checkpoints"].values():
        assert {"adapter_config.json", "adapter_model.safetensors", "optimizer.pt", "trainer_state.json"} <= set(files)
        assert "model.safetensors" not in files
    assert result["best"] == "checkpoint-2" and result["final_is_best"] and not result["final_is_last"]
    assert result["resumed_step"] == 6 and result["resumed_max_diff"] == 0.0
    check_adapter_folder(tmp_path / "adapter")


@pytest.mark.slow
def test_transformers_load_adapter_on_a_plain_model(tmp_path, sft_adapter):
    result = run_case("load_adapter", tmp_path, sft_adapter)
    assert result["active"] == ["mine"] and result["adapter_effect"] > 1e-3
    assert result["disabled_diff"] == result["enabled_diff"] == result["auto_diff"] == result["deleted_diff"] == 0.0
    assert not result["has_peft_config_after_delete"]
    logits = torch.load(tmp_path / "logits.pt")
    torch.testing.assert_close(logits["with_adapter"], check_adapter_folder(sft_adapter))
    assert result["active_added"] == ["fresh"]
    torch.testing.assert_close(logits["added"], check_adapter_folder(tmp_path / "added"))


def test_peftkit_trainer_with_default_arguments_and_best_model(tmp_path):
    """No install_as_peft: PeftkitTrainer alone, a datasets.Dataset with default remove_unused_columns."""
    datasets = pytest.importorskip("datasets")
    import transformers

    from peftkit.train import PeftkitTrainer

    model, tok = peftkit.load_model()
    torch.manual_seed(0)
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=4))
    tok.pad_token = tok.pad_token or tok.eos_token
    rows = [tok("Once upon a time there was a cat number " + str(i), return_tensors=None)["input_ids"] for i in range(12)]
    data = datasets.Dataset.from_list([{"input_ids": r, "labels": r, "unused_text": "x"} for r in rows])
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=4, save_steps=2, eval_steps=2,
                                          eval_strategy="steps", per_device_train_batch_size=4, learning_rate=1e-2,
                                          report_to=[], use_cpu=True, load_best_model_at_end=True,
                                          metric_for_best_model="eval_loss", greater_is_better=True, disable_tqdm=True)
    trainer = PeftkitTrainer(model=pm, args=args, train_dataset=data.select(range(8)), eval_dataset=data.select(range(8, 12)),
                             data_collator=transformers.DataCollatorForSeq2Seq(tok, padding=True))
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-2")
    best = peftkit.load_peft_weights(trainer.state.best_model_checkpoint)
    last = peftkit.load_peft_weights(str(tmp_path / "checkpoint-4"))
    now = peftkit.get_peft_model_state_dict(pm)
    assert all(torch.equal(best[k], now[k]) for k in best) and not all(torch.equal(last[k], now[k]) for k in last)
    trainer.save_model(str(tmp_path / "final"))
    check_adapter_folder(tmp_path / "final")


# -- accelerate ---------------------------------------------------------------------------------


def test_accelerate_prepare_unwrap_save_and_load_state(tmp_path):
    from accelerate import Accelerator

    def setup():
        torch.manual_seed(0)
        pm = peftkit.get_peft_model(peftkit.load_model()[0], peftkit.LoraConfig(task_type="CAUSAL_LM", r=4))
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-2)
        return pm, opt

    pm, opt = setup()
    accelerator = Accelerator(cpu=True)
    model, opt = accelerator.prepare(pm, opt)
    batch = torch.randint(3, 500, (4, 24), generator=torch.Generator().manual_seed(0))
    seen = []
    for _ in range(6):
        loss = model(input_ids=batch, labels=batch).loss
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        seen.append(loss.item())
    assert seen[-1] < seen[0]
    assert accelerator.unwrap_model(model) is pm
    accelerator.save_state(str(tmp_path / "state"))
    accelerator.unwrap_model(model).save_pretrained(str(tmp_path / "adapter"))
    check_adapter_folder(tmp_path / "adapter")
    trained = peftkit.get_peft_model_state_dict(pm)
    pm2, opt2 = setup()
    accelerator2 = Accelerator(cpu=True)
    model2, opt2 = accelerator2.prepare(pm2, opt2)
    accelerator2.load_state(str(tmp_path / "state"))
    restored = peftkit.get_peft_model_state_dict(accelerator2.unwrap_model(model2))
    for k, v in trained.items():
        torch.testing.assert_close(restored[k], v)
    assert opt2.state_dict()["state"], "optimizer state restored"


# -- lm-eval ------------------------------------------------------------------------------------


def write_lm_eval_task(folder) -> None:
    """A local multiple-choice task over the bundled E2E eval data: which description fits the record."""
    with open(peftkit.model_path().parent / "data" / "e2e_nlg_eval.jsonl", encoding="utf-8") as f:
        rows = [json.loads(line) for line in f][:12]
    with open(os.path.join(folder, "e2e_mc.jsonl"), "w", encoding="utf-8") as f:
        for i, r in enumerate(rows):
            other = rows[(i + 1) % len(rows)]["target"]
            choices = [r["target"], other] if i % 2 == 0 else [other, r["target"]]
            f.write(json.dumps({"source": r["source"], "choices": choices, "label": i % 2}) + "\n")
    with open(os.path.join(folder, "e2e_mc.yaml"), "w", encoding="utf-8") as f:
        f.write(textwrap.dedent(f"""\
            task: peftkit_e2e_mc
            dataset_path: json
            dataset_kwargs:
              data_files:
                test: {os.path.join(folder, "e2e_mc.jsonl")}
            test_split: test
            output_type: multiple_choice
            doc_to_text: "{{{{source}}}}\\n"
            doc_to_choice: choices
            doc_to_target: label
            metric_list:
              - metric: acc
                aggregation: mean
                higher_is_better: true
            """))


def lm_eval_cli(out, *model_args: str) -> list[list[float]]:
    cmd = [sys.executable, "-m", "peftkit", "as-peft", "lm_eval", "--model", "hf", "--model_args",
           ",".join([f"pretrained={peftkit.model_path()}", *model_args]), "--device", "cpu", "--tasks",
           "peftkit_e2e_mc", "--include_path", str(out), "--batch_size", "4", "--log_samples", "--output_path",
           str(out / "results")]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=ENV, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for folder, _, files in os.walk(out / "results"):
        for name in files:
            if name.startswith("samples_peftkit_e2e_mc"):
                with open(os.path.join(folder, name), encoding="utf-8") as f:
                    samples = [json.loads(line) for line in f]
                os.remove(os.path.join(folder, name))
                samples.sort(key=lambda s: s["doc_id"])
                return [[float(r[0][0]) for r in s["resps"]] for s in samples]
    raise AssertionError(f"no samples file under {out / 'results'}")


@pytest.mark.slow
def test_lm_eval_hflm_and_cli_peft_argument(tmp_path, sft_adapter):
    pytest.importorskip("lm_eval")
    write_lm_eval_task(str(tmp_path))
    in_process = run_case("lm_eval", tmp_path, sft_adapter)["loglikelihoods"]
    with_adapter = lm_eval_cli(tmp_path, f"peft={sft_adapter}")
    without = lm_eval_cli(tmp_path)
    assert len(in_process) == len(with_adapter) == 12
    for a, b in zip(in_process, with_adapter):
        assert a == pytest.approx(b, abs=1e-4)
    assert max(abs(a - b) for x, y in zip(with_adapter, without) for a, b in zip(x, y)) > 1e-2
