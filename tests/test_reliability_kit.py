"""Issue 16, the toolkit's part: every bad input gets a PeftkitError (or, in the CLI, one line and exit
code 2) before anything is changed; writes are atomic and keep the umask's permissions; checkpoints
are verified before they are used or pruned; one run per output folder at a time."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from pathlib import Path

import pytest

import peftkit
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.train.data import DataError, read_records

ROOT = Path(__file__).resolve().parent.parent
_TQDM = re.compile(r"\d+/\d+ \[[^\]]*\]$")
SHARED_DATA = ROOT.parent / "shared" / "data"


def _err(capsys, argv):
    """(exit code, stderr) of ``peftkit *argv``; the error must be one line, with no traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    # transformers' own progress bars ("Loading weights: 100%|...| 47/47 [00:00<00:00, ...]") aside, stderr is
    # the one error line
    lines = [line for line in captured.err.strip().splitlines() if line and not _TQDM.search(line)]
    if code == 2:
        assert len(lines) == 1 and lines[0].startswith("peftkit "), captured.err
    return code, "\n".join(lines)


# -- 1. TSV is read as GLUE and pandas read it ----------------------------------------------------------


def test_tsv_quotes_are_ordinary_characters(tmp_path):
    lines = ["label\tsentence"] + [f"{i % 2}\trow {i}" for i in range(39)]
    lines[5] = '1\t"the witness", he said'  # a field that starts with a quote but is not quoted
    lines[9] = '0\tsays "hi'  # an unmatched quote inside a field
    path = tmp_path / "d.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    recs = read_records(str(path))
    assert len(recs) == 39
    assert recs[4] == {"label": "1", "sentence": '"the witness", he said'}
    assert recs[8] == {"label": "0", "sentence": 'says "hi'}
    assert recs[9] == {"label": "1", "sentence": "row 9"}


def test_tsv_more_fields_than_the_header_names_the_line(tmp_path):
    path = tmp_path / "d.tsv"
    path.write_text("a\tb\nx\ty\nx\ty\tz\n", encoding="utf-8")
    with pytest.raises(DataError, match=r"line 3: 3 fields, more than the header's 2"):
        read_records(str(path))


def test_csv_keeps_its_quoting(tmp_path):
    path = tmp_path / "d.csv"
    path.write_text('text,label\n"a, ""quoted""\nline",1\nb,0\n', encoding="utf-8")
    assert read_records(str(path)) == [{"text": 'a, "quoted"\nline', "label": "1"}, {"text": "b", "label": "0"}]


@pytest.mark.skipif(not (SHARED_DATA / "mrpc" / "train.tsv").is_file(), reason="../shared/data/mrpc is absent")
@pytest.mark.parametrize("split", ["train", "dev", "test"])
def test_mrpc_reads_as_pandas_reads_it(split):
    pd = pytest.importorskip("pandas")
    path = SHARED_DATA / "mrpc" / f"{split}.tsv"
    recs = read_records(str(path))
    expected = pd.read_csv(path, sep="\t", quoting=csv.QUOTE_NONE, dtype=str, keep_default_na=False,
                           encoding="utf-8-sig").to_dict("records")
    assert recs == expected
    assert len(recs) == {"train": 3668, "dev": 408, "test": 1725}[split]
    if split == "train":
        assert recs[0]["#1 String"].startswith('Amrozi accused his brother, whom he called "the witness"')


@pytest.mark.skipif(not (SHARED_DATA / "mrpc" / "dev.tsv").is_file(), reason="../shared/data/mrpc is absent")
def test_mrpc_is_classification_data_with_its_columns_mapped():
    from peftkit.train.config import DataConfig
    from peftkit.train.data import prepare_data
    from peftkit.train.modeling import load_tokenizer

    tok = load_tokenizer(str(peftkit.model_path()))
    cfg = DataConfig(columns={"text": "#1 String", "text_pair": "#2 String", "label": "Quality"}, max_length=64)
    data = prepare_data(cfg, tok, lambda fmt: "SEQ_CLS", eval_source=str(SHARED_DATA / "mrpc" / "dev.tsv"),
                        need_train=False)
    assert data.format == "classification" and data.label_names == ["0", "1"] and len(data.eval) == 200


# -- 7. atomic writes keep the umask's permissions --------------------------------------------------------


@pytest.fixture
def umask():
    """Set the process umask for one test and restore it after."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _mode(path):
    return os.stat(path).st_mode & 0o777


@pytest.mark.parametrize("mask, fmode, dmode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700), (0o002, 0o664, 0o775)])
def test_atomic_writes_keep_the_umask(tmp_path, umask, mask, fmode, dmode):
    import torch

    from peftkit._io import atomic_write_bytes, current_umask
    from peftkit.train import checkpoints as ckpt

    umask(mask)
    assert current_umask() == mask
    atomic_write_bytes(tmp_path / "f.json", b"{}")
    assert _mode(tmp_path / "f.json") == fmode

    def save_adapter(folder):
        os.makedirs(folder)
        peftkit._io.save_tensors({"w": torch.ones(2)}, os.path.join(folder, "adapter_model.safetensors"))

    step = ckpt.write_checkpoint(str(tmp_path / "checkpoints"), 3, save_adapter=save_adapter, optimizer={"state": {}},
                                 scheduler={}, rng=[{}], state={"step": 3})
    assert _mode(step) == dmode and _mode(os.path.join(step, "adapter")) == dmode
    for root, _, names in os.walk(step):
        for name in names:
            assert _mode(os.path.join(root, name)) == fmode, name


def test_atomic_write_keeps_the_mode_of_the_file_it_replaces(tmp_path, umask):
    from peftkit._io import atomic_write_bytes

    umask(0o022)
    path = tmp_path / "private.json"
    path.write_bytes(b"old")
    os.chmod(path, 0o600)
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and _mode(path) == 0o600


# -- 3. pruning keeps the newest verified checkpoints ----------------------------------------------------


def _ckpt(folder, step, payload=None):
    import torch

    from peftkit._io import save_tensors
    from peftkit.train import checkpoints as ckpt

    def save_adapter(path):
        os.makedirs(path)
        save_tensors({"w": torch.full((2,), float(step))}, os.path.join(path, "adapter_model.safetensors"))

    return ckpt.write_checkpoint(str(folder), step, save_adapter=save_adapter,
                                 optimizer=payload if payload is not None else {"state": {}, "param_groups": []},
                                 scheduler={"last_epoch": step}, rng=[{}], state={"step": step})


def _corrupt(step_folder):
    """Flip one byte of the adapter's weights (the manifest no longer matches)."""
    path = os.path.join(step_folder, "adapter", "adapter_model.safetensors")
    data = bytearray(open(path, "rb").read())
    data[-1] ^= 0xFF
    open(path, "wb").write(bytes(data))


def test_prune_never_deletes_the_checkpoint_just_written(tmp_path):
    from peftkit.train import checkpoints as ckpt

    folder = tmp_path / "checkpoints"
    bad = _ckpt(folder, 12)
    _corrupt(bad)
    assert ckpt.verify(bad) is not None
    for step in (4, 8):  # a resumed run writes its checkpoints below the corrupt newest one
        path = _ckpt(folder, step)
        ckpt.prune(str(folder), keep=1, protect=path)
        assert os.path.isdir(path), step
        with pytest.warns(peftkit.PeftkitWarning, match="step-12"):
            assert ckpt.latest_checkpoint(str(folder)) == path
    assert sorted(os.listdir(folder)) == ["step-12", "step-8"]


def test_prune_keeps_the_newest_verified_and_the_protected_one(tmp_path):
    from peftkit.train import checkpoints as ckpt

    folder = tmp_path / "checkpoints"
    paths = {s: _ckpt(folder, s) for s in (2, 4, 6, 8)}
    _corrupt(paths[8])
    _corrupt(paths[6])
    ckpt.prune(str(folder), keep=1)  # the corrupt 8 and 6 do not count: 4 is kept, 2 goes
    assert sorted(os.listdir(folder)) == ["step-4", "step-6", "step-8"]
    ckpt.prune(str(folder), keep=1, protect=paths[8])
    assert sorted(os.listdir(folder)) == ["step-4", "step-6", "step-8"]
    paths[10] = _ckpt(folder, 10)
    ckpt.prune(str(folder), keep=2, protect=paths[10])  # 10 and 4 verify; nothing older is left
    assert sorted(os.listdir(folder)) == ["step-10", "step-4", "step-6", "step-8"]
    paths[12] = _ckpt(folder, 12)
    ckpt.prune(str(folder), keep=2, protect=paths[12])
    assert sorted(os.listdir(folder)) == ["step-10", "step-12"]


# -- a small run, killed or whole ---------------------------------------------------------------------------


class _Killed(BaseException):
    """Ends a run the way a crash does: no cleanup of the run's own (checkpoints stay as they are)."""


@pytest.fixture(scope="module")
def data_file(tmp_path_factory):
    from peftkit.train.data import bundled_data

    path = tmp_path_factory.mktemp("data") / "d.jsonl"
    recs = read_records(bundled_data()[0])[:20]
    path.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    return str(path)


def _flags(data_file, out, *extra):
    return ["--data", data_file, "--output-dir", str(out), "--max-steps", "6", "--save-steps", "2", "--batch-size", "4",
            "--eval-steps", "0", "--eval-generate-samples", "0", "--num-generations", "0", "--max-eval-samples", "4",
            "--logging-steps", "1", "--no-progress", "--r", "2", "--max-length", "160", *extra]


def _killed_run(data_file, out, at_step, *extra):
    """A run that dies after step ``at_step`` (its checkpoints up to then are complete)."""
    from peftkit.cli import build_train_parser, merge_settings, nest
    from peftkit.train import RunConfig, train

    def kill(trainer):
        if trainer.step == at_step:
            raise _Killed

    args = build_train_parser("lora").parse_args(_flags(data_file, out, *extra))
    with pytest.raises(_Killed):
        train(RunConfig.from_dict(merge_settings(None, nest(args))), callbacks=[kill], quiet=True)


def _snapshot(folder):
    """Every file under ``folder`` with its bytes and mode (to show an error changed nothing)."""
    out = {}
    for root, dirs, names in os.walk(folder):
        for name in dirs + names:
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            out[rel] = (open(path, "rb").read() if os.path.isfile(path) else None, os.stat(path).st_mode)
    return out


def _train_steps(out):
    return [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"train"' in line]


# -- 2 and 8. --resume continues the run exactly, or refuses before writing anything ------------------------


@pytest.mark.parametrize("change, named", [
    (["--lr", "0.5"], "train.lr: 0.0002 -> 0.5"),
    (["--r", "4"], "r: 2 -> 4"),
    (["--seed", "7"], "train.seed: 42 -> 7"),
    (["--target-modules", "q_proj,k_proj,v_proj"], "target_modules"),
    (["--max-steps", "8"], "train.max_steps: 6 -> 8"),
])
def test_resume_with_other_settings_is_refused_and_changes_nothing(tmp_path, data_file, capsys, change, named):
    out = tmp_path / "run"
    _killed_run(data_file, out, 5)
    before = _snapshot(out)
    code, err = _err(capsys, ["train", *_flags(data_file, out, "--resume", *change)])
    assert code == 2 and "--resume" in err and named in err, err
    assert _snapshot(out) == before


def test_resume_without_run_yaml_refuses_a_checkpoint_that_does_not_fit(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    _killed_run(data_file, out, 5)
    os.unlink(out / "run.yaml")  # a run of an older peftkit: only the checkpoint itself can tell
    before = _snapshot(out)
    code, err = _err(capsys, ["train", *_flags(data_file, out, "--resume", "--r", "4")])
    assert code == 2 and "does not fit this run" in err and "shape" in err, err
    assert _snapshot(out) == before
    code, err = _err(capsys, ["train", *_flags(data_file, out, "--resume", "--target-modules", "q_proj,k_proj,v_proj")])
    assert code == 2 and "does not fit this run" in err and "adapter tensors of this run are not in it" in err, err
    assert _snapshot(out) == before


def test_resume_may_change_how_the_run_is_watched_and_run_yaml_says_so(tmp_path, data_file, capsys):
    import yaml

    out = tmp_path / "run"
    _killed_run(data_file, out, 5)
    assert main(["train", *_flags(data_file, out, "--resume", "--save-steps", "3", "--logging-steps", "2")]) == 0
    stdout = capsys.readouterr().out
    assert "train.save_steps: 2 -> 3" in stdout and "resumed from" in stdout and "step-4" in stdout
    run = yaml.safe_load((out / "run.yaml").read_text())
    assert run["train"]["save_steps"] == 3 and run["train"]["logging_steps"] == 2
    assert run["train"]["lr"] == 0.0002 and run["method_args"]["r"] == 2


def test_trainer_resume_checks_every_shape_before_copying_anything(tmp_path):
    """The Python API: a checkpoint of another rank is refused and the model and optimizer are untouched."""
    import torch

    from peftkit.errors import CheckpointError
    from peftkit.train import Trainer
    from peftkit.train.config import DataConfig, TrainConfig
    from peftkit.train.data import bundled_data, prepare_data
    from peftkit.train.modeling import load_tokenizer

    tok = load_tokenizer(str(peftkit.model_path()))
    recs = read_records(bundled_data()[0])[:12]
    data = prepare_data(DataConfig(eval_fraction=0, max_length=160), tok, lambda f: "CAUSAL_LM",
                        train_source=recs[:8], eval_source=recs[8:])

    def trainer(r):
        model, _ = peftkit.load_model()
        pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=r))
        cfg = TrainConfig(max_steps=2, save_steps=1, batch_size=4, eval_steps=0, num_generations=0,
                          eval_generate_samples=0, progress=False)
        return Trainer(pm, tok, data.train, data.eval, cfg, task_type="CAUSAL_LM", output_dir=str(tmp_path), quiet=True)

    trainer(2).fit()
    other = trainer(4)
    params = {n: p.detach().clone() for n, p in other.model.named_parameters()}
    with pytest.raises(CheckpointError, match="does not fit this run: adapter tensor .* has shape"):
        other.resume()
    assert all(torch.equal(p, params[n]) for n, p in other.model.named_parameters())
    assert other.step == 0 and not other.optimizer.state


# -- 4. a checkpoint holding a pickle payload: never run, skipped for an older verified one ------------------


class _Payload:
    """Unpickling this would create a folder (if anything ran it)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def _reseal(step_folder):
    """Update COMPLETE.json to the files as they are now (what an attacker who rewrites it does)."""
    from peftkit.train import checkpoints as ckpt

    manifest = json.loads(open(os.path.join(step_folder, ckpt.MARKER)).read())
    for rel, meta in manifest["files"].items():
        path = os.path.join(step_folder, rel)
        meta["sha256"], meta["bytes"] = hashlib.sha256(open(path, "rb").read()).hexdigest(), os.path.getsize(path)
    open(os.path.join(step_folder, ckpt.MARKER), "w").write(json.dumps(manifest))
    assert ckpt.verify(step_folder) is None


def test_pickle_payload_in_a_checkpoint_never_runs_and_resume_falls_back(tmp_path, data_file, capsys):
    import torch

    out = tmp_path / "run"
    _killed_run(data_file, out, 5)
    marker = tmp_path / "payload-ran"
    newest = out / "checkpoints" / "step-4"
    torch.save({"state": {}, "param_groups": [], "x": _Payload(str(marker))}, newest / "optimizer.pt")
    _reseal(newest)
    with pytest.warns(peftkit.PeftkitWarning, match=r"Skipping checkpoint .*step-4: .*optimizer.pt cannot be read"):
        assert main(["train", *_flags(data_file, out, "--resume")]) == 0
    assert not marker.exists()
    stdout = capsys.readouterr().out
    assert "resumed from" in stdout and "step-2 (step 2 of 6)" in stdout
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]


def test_load_checkpoint_refuses_files_that_do_not_hold_what_they_should(tmp_path):
    import torch

    from peftkit.errors import CheckpointError
    from peftkit.train import checkpoints as ckpt

    folder = tmp_path / "checkpoints"
    step = _ckpt(folder, 2)
    torch.save([1, 2], os.path.join(step, "optimizer.pt"))  # loads with weights_only, but is no optimizer state
    _reseal(step)
    with pytest.raises(CheckpointError, match="optimizer.pt holds a list"):
        ckpt.load_checkpoint(step)
    torch.save({"state": {}, "param_groups": []}, os.path.join(step, "optimizer.pt"))
    open(os.path.join(step, "rng.pt"), "wb").write(b"not a pickle")
    _reseal(step)
    with pytest.raises(CheckpointError, match="rng.pt cannot be read safely"):
        ckpt.load_checkpoint(step)


# -- 5. one run per output folder --------------------------------------------------------------------------


def test_a_second_run_into_a_locked_folder_fails_at_once_naming_the_holder(tmp_path, data_file, capsys):
    import socket

    from peftkit.train.lock import LOCK_NAME, RunLock

    out = tmp_path / "run"
    with RunLock(str(out)):
        code, err = _err(capsys, ["train", *_flags(data_file, out)])
        assert code == 2 and f"pid {os.getpid()}" in err and socket.gethostname() in err and "started" in err
        assert os.listdir(out) == [LOCK_NAME]
    assert not out.exists()  # the lock made the folder and, with nothing written, took it away again
    assert main(["train", *_flags(data_file, out)]) == 0
    assert LOCK_NAME not in os.listdir(out)


def test_stale_lock_files_are_taken_over(tmp_path, monkeypatch):
    import socket
    import subprocess
    import sys

    from peftkit.train import lock as lock_mod

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    info = {"pid": int(dead.stdout), "host": socket.gethostname(), "started": 0}
    for use_flock in (True, False):  # the kernel lock, and the O_EXCL file where flock is missing
        if not use_flock:
            monkeypatch.setattr(lock_mod.RunLock, "_try_flock", lambda self: False)
        (tmp_path / lock_mod.LOCK_NAME).write_text(json.dumps(info))
        with lock_mod.RunLock(str(tmp_path)) as held:
            assert json.loads((tmp_path / lock_mod.LOCK_NAME).read_text())["pid"] == os.getpid()
            with pytest.raises(lock_mod.RunLockedError, match=f"pid {os.getpid()} on host"):
                lock_mod.RunLock(str(tmp_path)).acquire()
            assert held.path.endswith(lock_mod.LOCK_NAME)
        assert not (tmp_path / lock_mod.LOCK_NAME).exists()


def test_lock_in_a_folder_that_cannot_be_written_is_one_clear_error(tmp_path, monkeypatch):
    from peftkit.train import lock as lock_mod

    real_open = os.open

    def refuse(path, flags, *args):
        if str(path).endswith(lock_mod.LOCK_NAME):
            raise PermissionError(13, "Permission denied", path)
        return real_open(path, flags, *args)

    monkeypatch.setattr(lock_mod.os, "open", refuse)
    with pytest.raises(PeftkitError, match="Cannot write into the output folder .*Permission denied"):
        lock_mod.RunLock(str(tmp_path / "new")).acquire()
    assert not (tmp_path / "new").exists()


# -- 6. a run that starts over starts its metrics over -------------------------------------------------------


def test_resume_without_a_usable_checkpoint_starts_metrics_over(tmp_path, data_file, capsys):
    out = tmp_path / "run"
    _killed_run(data_file, out, 5)
    assert _train_steps(out) == [1, 2, 3, 4, 5]
    for step in ("step-2", "step-4"):
        _corrupt(out / "checkpoints" / step)
    with pytest.warns(peftkit.PeftkitWarning, match="Skipping checkpoint"):
        assert main(["train", *_flags(data_file, out, "--resume")]) == 0
    assert "no usable checkpoint; starting from step 0" in capsys.readouterr().out
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]
    before = [e for e in map(json.loads, open(out / "metrics.jsonl")) if e.get("tag") == "before"]
    assert len(before) == 1


def test_a_killed_run_before_its_first_checkpoint_is_run_again_with_fresh_metrics(tmp_path, data_file):
    out = tmp_path / "run"
    _killed_run(data_file, out, 1)  # no checkpoint yet: the folder holds no run, a plain rerun is allowed
    assert main(["train", *_flags(data_file, out)]) == 0
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]


# -- 9. bad flags: one line, exit code 2, before any model is loaded -----------------------------------------


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a command gets as far as loading a model or tokenizer."""
    from peftkit.train import runner

    def loaded(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was refused")

    for name in ("load_tokenizer", "load_model", "load_for_inference"):
        monkeypatch.setattr(runner, name, loaded)


@pytest.mark.parametrize("flags, says", [
    (["--lr", "-1"], "lr (--lr) must be >= 0.0, got -1"),
    (["--lr", "nan"], "lr (--lr) must be a finite number"),
    (["--weight-decay", "-0.1"], "weight_decay (--weight-decay) must be >= 0.0"),
    (["--weight-decay", "nan"], "weight_decay (--weight-decay) must be a finite number"),
    (["--warmup-ratio", "-0.1"], "warmup_ratio (--warmup-ratio) must be in [0.0, 1.0]"),
    (["--max-length", "0"], "max_length (--max-length) must be >= 1"),
    (["--prompt-template", "{instruction} {foo}"], "unknown field {foo}"),
    (["--prompt-template", "{} {input}"], "positional field {}"),
    (["--prompt-template-no-input", "{0}"], "positional field {0}"),
    (["--prompt-template", "{instruction"], "not a valid template"),
    (["--device", "banana"], "--device 'banana' is not a device"),
    (["--max-new-tokens", "-1"], "max_new_tokens (--max-new-tokens) must be >= 1"),
    (["--save-total-limit", "0"], "save_total_limit (--save-total-limit) must be >= 1"),
    (["--lr", "abc"], "argument --lr"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_train_bad_values(tmp_path, capsys, no_loading, flags, says):
    code, err = _err(capsys, ["train", "--output-dir", str(tmp_path / "run"), *flags])
    assert code == 2 and says in err, err
    assert not (tmp_path / "run").exists()


def test_output_dir_that_is_a_file(tmp_path, capsys, no_loading):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    for argv in (["train", "--output-dir", str(afile)], ["merge", str(adapter), "--output-dir", str(afile)],
                 ["merge", str(adapter), "--output-dir", str(afile / "sub")]):
        code, err = _err(capsys, argv)
        assert code == 2 and str(afile) in err and "file" in err, err
    assert afile.read_text() == "keep me"


def test_inference_commands_bad_values(tmp_path, capsys, no_loading):
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    bad_prompts = tmp_path / "prompts.txt"
    bad_prompts.write_bytes(b"\xff\xfe caf\xe9\n")
    cases = [
        (["eval", str(adapter), "--batch-size", "0"], "argument --batch-size: must be >= 1, got 0"),
        (["eval", str(adapter), "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1"),
        (["eval", str(adapter), "--max-length", "0"], "argument --max-length: must be >= 1"),
        (["eval", str(adapter), "--device", "banana"], "not a device"),
        (["eval", str(adapter), "--output", str(tmp_path)], "is a folder"),
        (["generate", "--prompt", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: must be >= 1"),
        (["generate", "--prompts-file", str(tmp_path)], "is a folder; give a text file"),
        (["generate", "--prompts-file", str(bad_prompts)], "is not UTF-8 text"),
        (["generate", "--prompt", "x", "--device", "banana"], "not a device"),
        (["generate", "--prompt", "x", "--adapter", str(tmp_path / "none")], "does not exist"),
        (["merge", str(tmp_path / "none"), "--output-dir", str(tmp_path / "m")], "does not exist"),
    ]
    for argv, says in cases:
        code, err = _err(capsys, argv)
        assert code == 2 and says in err, (argv, err)
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("content, says", [
    (b"[1, 2]", "holds a JSON list"),
    (b'"text"', "holds a JSON str"),
    (b"\xff\xfe{\x00}\x00", "not UTF-8 text"),
    (b"{not json", "not valid JSON"),
])
def test_inspect_bad_configs(tmp_path, capsys, content, says):
    (tmp_path / "adapter_config.json").write_bytes(content)
    code, err = _err(capsys, ["inspect", str(tmp_path)])
    assert code == 2 and says in err, err


def test_config_file_not_utf8(tmp_path, capsys, no_loading):
    bad = tmp_path / "run.yaml"
    bad.write_bytes(b"lr: 0.1\n# caf\xe9\n")
    code, err = _err(capsys, ["train", "--config", str(bad)])
    assert code == 2 and "not UTF-8" in err


def test_the_python_api_raises_peftkit_errors():
    from peftkit.train import DataConfig, RunConfig, TrainConfig

    with pytest.raises(PeftkitError, match="finite"):
        TrainConfig(lr=float("nan"))
    with pytest.raises(PeftkitError, match="must be >= 1"):
        TrainConfig(batch_size=0)
    with pytest.raises(PeftkitError, match="positional"):
        DataConfig(prompt_template="{}")
    with pytest.raises(PeftkitError, match="max_length"):
        RunConfig.from_dict({"max_length": -3})
    run = RunConfig()
    run.train.lr = -1.0  # changed after construction: train() checks again before anything else
    with pytest.raises(PeftkitError, match="lr"):
        peftkit.train.train(run)


def test_unwritable_output_folder_is_one_line(tmp_path, capsys, monkeypatch, no_loading):
    import errno

    from peftkit.train import lock as lock_mod

    def read_only(path, flags, *args):
        raise OSError(errno.EROFS, "Read-only file system", path)

    monkeypatch.setattr(lock_mod.os, "open", read_only)
    code, err = _err(capsys, ["train", "--output-dir", str(tmp_path / "run")])
    assert code == 2 and "Read-only file system" in err and "--output-dir" in err


def test_cli_guard_one_line_for_environment_errors_traceback_for_bugs(capsys, monkeypatch):
    import errno

    from peftkit import cli

    def denied(argv):
        raise PermissionError(errno.EACCES, "Permission denied", "/srv/out/run.yaml")

    monkeypatch.setitem(cli.COMMANDS, "inspect", (denied, ""))
    code, err = _err(capsys, ["inspect", "x"])
    assert code == 2 and "/srv/out/run.yaml: Permission denied" in err

    def bug(argv):
        raise RuntimeError("a bug")

    monkeypatch.setitem(cli.COMMANDS, "inspect", (bug, ""))
    with pytest.raises(RuntimeError, match="a bug"):
        main(["inspect", "x"])


# -- 11. every method trains on the demo ---------------------------------------------------------------------

DEMO_FLAGS = ["--max-steps", "2", "--batch-size", "4", "--max-eval-samples", "4", "--eval-generate-samples", "0",
              "--num-generations", "0", "--eval-steps", "0", "--save-steps", "0", "--no-progress"]


def _method_spellings():
    from peftkit.train import method_names

    names = sorted(method_names())
    # the spellings with "_" that users type from the peft_type (p_tuning, prompt_tuning, ...)
    return names + sorted({n.replace("-", "_") for n in names if "-" in n})


@pytest.mark.slow
@pytest.mark.parametrize("method", _method_spellings())
def test_every_method_trains_on_the_demo(tmp_path, capsys, method):
    out = tmp_path / "run"
    code, err = _err(capsys, ["train", "--method", method, "--output-dir", str(out), *DEMO_FLAGS])
    if method == "bitfit":  # the bundled Llama has no bias anywhere: refused, saying what to use instead
        assert code == 2 and "no bias" in err and "Use another method" in err, err
        assert not out.exists()
        return
    assert code == 0, err
    assert (out / "adapter" / "adapter_config.json").is_file() and _train_steps(out) == [2]


# -- 10. a merge that fails leaves nothing behind ------------------------------------------------------------


@pytest.fixture(scope="module")
def lora_adapter(tmp_path_factory):
    import torch

    model, _ = peftkit.load_model()
    pm = peftkit.get_peft_model(model, peftkit.LoraConfig(task_type="CAUSAL_LM", r=2, init_lora_weights="gaussian"))
    with torch.no_grad():
        for n, p in pm.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.05)
    folder = tmp_path_factory.mktemp("adapter") / "adapter"
    pm.save_pretrained(str(folder))
    return str(folder)


@pytest.mark.parametrize("where", ["verify", "write"])
def test_failed_merge_leaves_no_output_folder(tmp_path, capsys, monkeypatch, lora_adapter, where):
    from peftkit.cli import merge as merge_mod

    def fail(*args, **kwargs):
        if where == "write":
            os.makedirs(args[2], exist_ok=True)
            open(os.path.join(args[2], "model.safetensors"), "wb").write(b"half")
        raise PeftkitError("The merged model's output differs from the adapter model's (simulated).")

    monkeypatch.setattr(merge_mod, "_verify_merged" if where == "verify" else "_write_merged", fail)
    out = tmp_path / "deep" / "merged"
    code, err = _err(capsys, ["merge", lora_adapter, "--output-dir", str(out)])
    assert code == 2 and "simulated" in err
    assert os.listdir(tmp_path) == []  # no merged/, no hidden staging folder, not even deep/
    (tmp_path / "empty").mkdir()
    code, err = _err(capsys, ["merge", lora_adapter, "--output-dir", str(tmp_path / "empty")])
    assert code == 2 and os.listdir(tmp_path) == ["empty"] and os.listdir(tmp_path / "empty") == []


def test_merge_writes_the_verified_folder_in_place(tmp_path, capsys, lora_adapter, umask):
    umask(0o022)
    out = tmp_path / "merged"
    assert main(["merge", lora_adapter, "--output-dir", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "verified" in stdout and f"wrote {out}" in stdout
    assert sorted(os.listdir(tmp_path)) == ["merged"] and (out / "config.json").is_file()
    assert _mode(out) == 0o755


def test_resume_with_the_runs_own_run_yaml_as_config(tmp_path, data_file, capsys):
    """What the refusal suggests: --config <its run.yaml> --resume continues the run."""
    import shutil

    out = tmp_path / "run"
    _killed_run(data_file, out, 5, "--lr", "0.001")
    shutil.copy(out / "run.yaml", tmp_path / "saved.yaml")
    with open(out / "metrics.jsonl", "a") as fh:
        fh.write('[1, 2]\n"x"\n{"event": "train", "step": "?"}\n{"event": "train", "st')  # junk and a cut line
    assert main(["train", "--config", str(tmp_path / "saved.yaml"), "--resume"]) == 0
    assert "resumed from" in capsys.readouterr().out
    assert _train_steps(out) == [1, 2, 3, 4, 5, 6]
