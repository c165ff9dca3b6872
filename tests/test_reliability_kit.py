"""Issue 16, the toolkit's part: every bad input gets a PeftkitError (or, in the CLI, one line and exit
code 2) before anything is changed; writes are atomic and keep the umask's permissions; checkpoints
are verified before they are used or pruned; one run per output folder at a time."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest

import peftkit
from peftkit.cli import main
from peftkit.errors import PeftkitError
from peftkit.train.data import DataError, read_records

ROOT = Path(__file__).resolve().parent.parent
SHARED_DATA = ROOT.parent / "shared" / "data"


def _err(capsys, argv):
    """(exit code, stderr) of ``peftkit *argv``; the error must be one line, with no traceback."""
    code = main(argv)
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    if code == 2:
        assert len(err.splitlines()) == 1, err
    return code, err


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
