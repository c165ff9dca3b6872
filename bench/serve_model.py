"""The serve benchmark's model: a small random Llama with head_dim 32 and K LoRA adapters for it.

    python bench/serve_model.py [--out /tmp/peftkit-serve-bench] [--adapters 32] [--seed 0]

vLLM's CPU attention needs head_dim >= 32, which the bundled model (head_dim 8) does not have, so the
serve benchmark runs all engines on this model instead: hidden 256, 8 query heads and 8 KV heads of
32, 4 layers, intermediate 688, vocabulary 512 (the bundled tokenizer, whose files are copied in), at
most 1024 positions, random weights (``initializer_range`` 0.1, so that greedy decoding does not sit
on near-ties), float32, seed fixed. Its folder layout::

    OUT/base/                  config.json, model.safetensors, tokenizer files
    OUT/adapters/a00 ... aNN   LoRA r=8, alpha 16 on q,k,v,o,gate,up,down of every block

Each adapter is peftkit's LoraConfig with ``B ~ N(0, b_std^2)`` instead of zeros (seeded per
adapter), so that ``W x + (alpha / r) B A x`` moves the greedy tokens; saved with peftkit's
``save_pretrained`` (the Hugging Face PEFT format that vLLM reads). Writing is deterministic: the same
arguments give byte-identical tensors. A ``bench.json`` stamp holds the arguments; a folder whose stamp
matches is reused as it is.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_OUT = os.path.join(tempfile.gettempdir(), "peftkit-serve-bench")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def model_config():
    """The base model's LlamaConfig (head_dim 256 / 8 = 32)."""
    from transformers import LlamaConfig

    import peftkit

    tok_cfg = json.loads((peftkit.model_path() / "config.json").read_text())
    return LlamaConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=8, num_key_value_heads=8,
                       intermediate_size=688, vocab_size=512, max_position_embeddings=1024,
                       initializer_range=0.1, tie_word_embeddings=False, dtype="float32",
                       bos_token_id=tok_cfg.get("bos_token_id", 1), eos_token_id=tok_cfg.get("eos_token_id", 2),
                       pad_token_id=tok_cfg.get("pad_token_id", 0) or 0)


def build_base(seed: int = 0):
    """The random base model (eval mode, float32), the same weights for the same seed."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(model_config()).eval()


def lora_config():
    from peftkit import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, target_modules=list(TARGETS), task_type="CAUSAL_LM")


def randomize_b(model, adapter: str, seed: int, b_std: float) -> None:
    """Set every ``lora_B[adapter]`` (and, for determinism, ``lora_A[adapter]``) from a generator
    seeded with ``seed``: A ~ U(-1/sqrt(in), 1/sqrt(in)), B ~ N(0, b_std^2)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters()):
            if f".lora_A.{adapter}." in name:
                bound = param.shape[1] ** -0.5
                param.copy_((torch.rand(param.shape, generator=g) * 2 - 1) * bound)
            elif f".lora_B.{adapter}." in name:
                param.copy_(torch.randn(param.shape, generator=g) * b_std)


def adapter_names(n: int) -> list[str]:
    return [f"a{i:02d}" for i in range(n)]


def write_bench_model(out: str | os.PathLike = DEFAULT_OUT, n_adapters: int = 32, seed: int = 0,
                      b_std: float = 0.05) -> tuple[str, dict[str, str]]:
    """Write (or reuse) the base folder and ``n_adapters`` adapter folders under ``out``.

    Returns ``(base_dir, {adapter name: adapter dir})``."""
    import peftkit
    from peftkit import get_peft_model

    out = Path(out)
    base_dir, adapters_dir = out / "base", out / "adapters"
    names = adapter_names(n_adapters)
    paths = {n: str(adapters_dir / n) for n in names}
    stamp = {"seed": seed, "n_adapters": n_adapters, "b_std": b_std, "version": 1}
    stamp_file = out / "bench.json"
    if stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return str(base_dir), paths
    if out.exists():
        shutil.rmtree(out)
    base = build_base(seed)
    base.save_pretrained(base_dir)
    for f in TOKENIZER_FILES:
        shutil.copy(peftkit.model_path() / f, base_dir / f)
    model = get_peft_model(base, lora_config(), adapter_name=names[0])
    for name in names[1:]:
        model.add_adapter(name, lora_config())
    for i, name in enumerate(names):
        randomize_b(model, name, seed=1000 * (seed + 1) + i, b_std=b_std)
    model.save_pretrained(adapters_dir, selected_adapters=names)  # each in adapters/<name>/
    for name in names:  # vLLM reads base_model_name_or_path only for display; point it at the base anyway
        cfg_file = Path(paths[name]) / "adapter_config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg["base_model_name_or_path"] = str(base_dir)
        cfg_file.write_text(json.dumps(cfg, indent=2, sort_keys=True))
    stamp_file.write_text(json.dumps(stamp))
    return str(base_dir), paths


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=DEFAULT_OUT, help=f"folder to write (default {DEFAULT_OUT})")
    ap.add_argument("--adapters", type=int, default=32, help="number of LoRA adapters (default 32)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--b-std", type=float, default=0.05, help="standard deviation of the random lora_B")
    args = ap.parse_args(argv)
    base, adapters = write_bench_model(args.out, args.adapters, args.seed, args.b_std)
    print(f"base: {base}")
    print(f"adapters: {len(adapters)} under {Path(base).parent / 'adapters'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
