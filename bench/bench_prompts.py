"""Multi-task soft-prompt serving: 8 soft prompts on one frozen model, peftkit vs Hugging Face PEFT.

    python bench/bench_prompts.py [--quick] [--threads 2]

Model: Llama config hidden 512, 8 layers, 8 heads / 4 KV heads (GQA), intermediate 1376, vocab 8000,
random weights. 8 prompt-tuning adapters of 20 virtual tokens; a batch of 32 rows (4 per adapter),
64 tokens each. Measured (median wall time):

* peftkit, one mixed batch: ``model(ids, adapter_names=[...])`` - every row with its own prompt;
* peftkit, 8 batches: ``set_adapter(a)`` then the 4 rows of ``a``, for each adapter;
* Hugging Face PEFT, 8 batches: the same with ``peft`` (it cannot batch different prompts);
* the base model on the same 32 rows lengthened by 20 tokens (the floor: same attention length).

The same for greedy ``generate`` (16 new tokens), and peftkit alone for 8 adapters of mixed methods
and lengths (HF PEFT cannot hold prompt tuning, P-tuning and prefix tuning in one model). Each mixed
result is checked against the per-adapter result before timing; the variants of a row are timed
round-robin so that load on a shared machine affects them alike. Prints a Markdown table; figures
in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings

import torch

N_ADAPTERS = 8
ROWS_PER_ADAPTER = 4
SEQ = 64
N_VIRTUAL = 20
NEW_TOKENS = 16


def llama(seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=4,
                      intermediate_size=1376, vocab_size=8000, max_position_embeddings=512, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def race(fns: dict, repeat: int) -> dict:
    """Median wall time of each function, run round-robin (so that load changes on a shared machine
    hit every variant alike) after one warm-up call each."""
    for fn in fns.values():
        fn()
    times = {k: [] for k in fns}
    for _ in range(repeat):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def build_adapters(folder: str) -> list[str]:
    """Write 8 prompt-tuning adapter folders (peftkit writes them; both libraries read them)."""
    import peftkit

    names = []
    for i in range(N_ADAPTERS):
        torch.manual_seed(100 + i)
        pm = peftkit.get_peft_model(llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM",
                                                                          num_virtual_tokens=N_VIRTUAL))
        with torch.no_grad():
            pm.prompt_encoder["default"].embedding.weight.mul_(0.05)  # word-embedding scale
        path = os.path.join(folder, f"task{i}")
        pm.save_pretrained(path)
        names.append(path)
    return names


def load_all(lib, paths):
    model = llama()
    pm = lib.PeftModel.from_pretrained(model, paths[0], adapter_name="task0")
    for i, p in enumerate(paths[1:], start=1):
        pm.load_adapter(p, adapter_name=f"task{i}")
    return pm.eval()


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="fewer repeats")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    repeat = 3 if args.quick else 7
    import peft

    import peftkit

    B = N_ADAPTERS * ROWS_PER_ADAPTER
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 8000, (B, SEQ), generator=g)
    mask = torch.ones_like(ids)
    names = [f"task{i % N_ADAPTERS}" for i in range(B)]  # interleaved: a realistic request mix
    groups = {n: [i for i, m in enumerate(names) if m == n] for n in dict.fromkeys(names)}

    with tempfile.TemporaryDirectory() as tmp:
        paths = build_adapters(tmp)
        ours = load_all(peftkit, paths)
        theirs = load_all(peft, paths)

    rows = []

    # -- forward ---------------------------------------------------------------------------------
    def ours_mixed():
        with torch.no_grad():
            return ours(input_ids=ids, attention_mask=mask, adapter_names=names).logits

    def per_adapter(pm):
        def run():
            out = {}
            with torch.no_grad():
                for n, idx in groups.items():
                    pm.set_adapter(n)
                    out[n] = pm(input_ids=ids[idx], attention_mask=mask[idx]).logits
            return out
        return run

    base = llama()
    long_ids = torch.randint(3, 8000, (B, SEQ + N_VIRTUAL), generator=g)

    def base_fwd():
        with torch.no_grad():
            return base(input_ids=long_ids).logits

    mixed = ours_mixed()
    sep_ours, sep_theirs = per_adapter(ours)(), per_adapter(theirs)()
    for n, idx in groups.items():
        torch.testing.assert_close(mixed[idx], sep_ours[n], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(sep_ours[n], sep_theirs[n], atol=1e-4, rtol=1e-4)
    t = race({"base": base_fwd, "mixed": ours_mixed, "sep": per_adapter(ours), "hf": per_adapter(theirs)}, repeat)
    rows.append(("forward, 32 rows x 64 tokens", t["base"], t["mixed"], t["sep"], t["hf"]))

    # -- greedy generation -----------------------------------------------------------------------
    gen = {"max_new_tokens": NEW_TOKENS, "do_sample": False, "pad_token_id": 0, "min_new_tokens": NEW_TOKENS}
    gids, gmask = ids[:, :32], mask[:, :32]

    def ours_gen_mixed():
        return ours.generate(input_ids=gids, attention_mask=gmask, adapter_names=names, **gen)

    def gen_per_adapter(pm):
        def run():
            out = {}
            for n, idx in groups.items():
                pm.set_adapter(n)
                out[n] = pm.generate(input_ids=gids[idx], attention_mask=gmask[idx], **gen)
            return out
        return run

    def base_gen():
        return base.generate(input_ids=long_ids[:, :32 + N_VIRTUAL], **gen)

    gm = ours_gen_mixed()
    gs, gh = gen_per_adapter(ours)(), gen_per_adapter(theirs)()
    agree = sum(torch.equal(gm[idx], gs[n]) for n, idx in groups.items())
    agree_hf = sum(torch.equal(gs[n], gh[n]) for n in groups)
    t = race({"base": base_gen, "mixed": ours_gen_mixed, "sep": gen_per_adapter(ours), "hf": gen_per_adapter(theirs)},
             max(2, repeat // 2))
    rows.append((f"generate, 32 rows x 32 tokens + {NEW_TOKENS} new", t["base"], t["mixed"], t["sep"], t["hf"]))

    # -- mixed methods and lengths (peftkit only) --------------------------------------------------
    het = peftkit.get_peft_model(llama(), peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=8),
                                 adapter_name="m0")
    configs = [
        peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=16),
        peftkit.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=32),
        peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=12),
        peftkit.PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=24, encoder_reparameterization_type="LSTM"),
        peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=10),
        peftkit.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=30, prefix_projection=True),
        peftkit.p_tuning_v2_config(20, task_type="CAUSAL_LM"),
    ]
    for i, c in enumerate(configs, start=1):
        het.add_adapter(f"m{i}", c)
    het.eval()
    het_names = [f"m{i % N_ADAPTERS}" for i in range(B)]
    het_groups = {n: [i for i, m in enumerate(het_names) if m == n] for n in dict.fromkeys(het_names)}

    def het_mixed():
        with torch.no_grad():
            return het(input_ids=ids, attention_mask=mask, adapter_names=het_names).logits

    def het_sep():
        out = {}
        with torch.no_grad():
            for n, idx in het_groups.items():
                het.set_adapter(n)
                out[n] = het(input_ids=ids[idx], attention_mask=mask[idx]).logits
        return out

    hm, hs = het_mixed(), het_sep()
    for n, idx in het_groups.items():
        torch.testing.assert_close(hm[idx, -hs[n].shape[1]:], hs[n], atol=1e-4, rtol=1e-4)
    t = race({"base": base_fwd, "mixed": het_mixed, "sep": het_sep}, repeat)
    rows.append(("forward, 8 methods/lengths (8-32 tokens)", t["base"], t["mixed"], t["sep"], None))

    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, peft {peft.__version__}, python {sys.version.split()[0]}")
    print(f"checks: mixed == per-adapter logits (all 8 groups); greedy generations mixed == per-adapter "
          f"{agree}/8, peftkit == HF PEFT {agree_hf}/8\n")
    print("| workload | base model (+20 tokens) | peftkit mixed batch | peftkit 8 batches | HF PEFT 8 batches "
          "| HF 8 batches / peftkit mixed | mixed / base |")
    print("|---|---|---|---|---|---|---|")
    for name, tb, tm, ts, th in rows:
        hf = f"{th * 1000:.0f} ms" if th is not None else "n/a (one method per model)"
        ratio = f"{th / tm:.2f}x" if th is not None else f"{ts / tm:.2f}x vs 8 batches"
        print(f"| {name} | {tb * 1000:.0f} ms | {tm * 1000:.0f} ms | {ts * 1000:.0f} ms | {hf} | {ratio} "
              f"| {tm / tb:.2f}x |")


if __name__ == "__main__":
    main()
