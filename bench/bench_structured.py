"""Structured pruning: forward latency and parameters of a mid-sized random Llama before and after
removing attention heads and MLP channels physically (peftkit.prune.structured).

    python bench/bench_structured.py [--heads 0.3] [--channels 0.3] [--repeats 7] [--threads 1] [--vocab 32000]

The model: LlamaForCausalLM with hidden 512, 8 layers, 8 query heads over 4 KV heads (head_dim 64),
intermediate 1376, random weights (seed 0). Input: a batch of 8 x 128 random tokens. Each figure is
the median of ``--repeats`` timed no-grad forwards after one warm-up, with ``torch.set_num_threads``
threads. "layers" times the decoder stack alone (``model.model``, no LM head), whose cost is what
pruning shrinks; "full" adds the LM head (vocab x 512), which pruning leaves alone. Grouped-query
attention removes whole KV groups: ``--heads 0.3`` of 8 heads rounds to 2 heads, one group of 2.
Both models are checked to give the same logits as the dense model with the same units masked, so
the speed-up is for the same function. There is no peer: Hugging Face PEFT has no structured pruning.
"""

from __future__ import annotations

import argparse
import copy
import platform
import statistics
import time

import torch

from peftkit.prune.structured import structured_prune


def build(vocab: int) -> torch.nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=512, intermediate_size=1376, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=4, vocab_size=vocab, max_position_embeddings=256)
    return LlamaForCausalLM(cfg).eval()


def median_ms(fn, repeats: int) -> float:
    with torch.no_grad():
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def masked_logits(dense: torch.nn.Module, result, x: torch.Tensor) -> torch.Tensor:
    """The dense model's logits with the removed heads' o_proj and channels' down_proj columns zeroed."""
    model = copy.deepcopy(dense)
    d = model.config.head_dim
    with torch.no_grad():
        for layer, heads, chans in zip(model.model.layers, result.heads_removed, result.channels_removed):
            layer.self_attn.o_proj.weight[:, [h * d + k for h in heads for k in range(d)]] = 0
            layer.mlp.down_proj.weight[:, chans] = 0
        return model(input_ids=x).logits


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--heads", type=float, default=0.3)
    ap.add_argument("--channels", type=float, default=0.3)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vocab", type=int, default=32000)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    x = torch.randint(0, args.vocab, (8, 128), generator=torch.Generator().manual_seed(1))
    dense = build(args.vocab)
    pruned = copy.deepcopy(dense)
    result = structured_prune(pruned, args.heads, args.channels)
    with torch.no_grad():
        err = (pruned(input_ids=x).logits - masked_logits(dense, result, x)).abs().max().item()

    def layer_params(m: torch.nn.Module) -> int:
        return sum(p.numel() for p in m.model.layers.parameters())

    rows = []
    for label, model in (("dense", dense), ("pruned", pruned)):
        rows.append((label, sum(p.numel() for p in model.parameters()), layer_params(model),
                     median_ms(lambda: model.model(input_ids=x), args.repeats),
                     median_ms(lambda: model(input_ids=x), args.repeats)))
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, {args.threads} thread(s), "
          f"batch 8 x 128, median of {args.repeats}")
    print(f"# {result.summary()}")
    print(f"# max |pruned - masked dense| logits: {err:.2e}; config describes the model: "
          f"{result.config_describes_model}")
    print(f"{'model':8} {'params':>12} {'layer params':>13} {'layers ms':>10} {'full ms':>9} "
          f"{'speed-up (layers/full)':>24}")
    base = rows[0]
    for label, total, layers, t_layers, t_full in rows:
        print(f"{label:8} {total:>12,} {layers:>13,} {t_layers:>10.1f} {t_full:>9.1f} "
              f"{base[3] / t_layers:>11.2f}x / {base[4] / t_full:.2f}x")
    print(f"parameter reduction: {100 * (1 - rows[1][1] / base[1]):.1f}% of the model, "
          f"{100 * (1 - rows[1][2] / base[2]):.1f}% of the decoder layers")


if __name__ == "__main__":
    main()
