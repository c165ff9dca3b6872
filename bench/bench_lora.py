"""LoRA speed and memory, peftkit side by side with Hugging Face PEFT in one run.

    python bench/bench_lora.py [--quick] [--only mixed,overhead,train,inject,floor]

Model: Llama config hidden 512, 8 layers, 8 heads, intermediate 1376, vocab 8000, random weights;
2 CPU threads. Prints a Markdown table of times and ratios. Figures: docs/benchmarks.md. ``floor``
(peftkit only, not in the default list) times the decode-shaped unmerged adapter with each LoRA
layer's forward replaced by bare tensor ops, to show what the wrapper code costs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import torch

THREADS = 2


def llama(seed: int = 0, device: str = "cpu"):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(hidden_size=512, num_hidden_layers=8, num_attention_heads=8, num_key_value_heads=8,
                      intermediate_size=1376, vocab_size=8000, max_position_embeddings=512)
    with torch.device(device):
        return LlamaForCausalLM(cfg).eval()


def timeit(fn, repeat: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def paired(fn_a, fn_b, repeat: int, warmup: int = 2) -> tuple[float, float, float]:
    """Median times of two functions measured in alternating order (ABBA...), so load changes and
    order effects hit both alike, and the median of the per-pair ratios b/a (robust to drift)."""
    for _ in range(warmup):
        fn_a(), fn_b()
    ta, tb = [], []
    for i in range(repeat):
        pair = {}
        for key, fn in ((("a", fn_a), ("b", fn_b)) if i % 2 == 0 else (("b", fn_b), ("a", fn_a))):
            t = time.perf_counter()
            fn()
            pair[key] = time.perf_counter() - t
        ta.append(pair["a"])
        tb.append(pair["b"])
    return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))


def sharing(plain):
    """A second model object whose parameters are ``plain``'s own tensors: the adapter model and
    the base it is timed against read the same weight memory, so layout luck cannot favour either."""
    model = llama()
    model.load_state_dict(plain.state_dict(), assign=True)
    return model


def randomize(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)


def libs():
    import peft

    import peftkit

    return {"peftkit": peftkit, "peft": peft}


# ---------------------------------------------------------------------------------------------


def bench_mixed(quick: bool) -> list[dict]:
    """32 adapters r=16 all-linear, 32 rows each its own adapter, vs the base forward."""
    rows = []
    n_adapters = 32
    plain = llama()  # the base model with no adapter code at all
    for lib_name, lib in libs().items():
        model = sharing(plain)
        cfg = lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")
        pm = lib.get_peft_model(model, cfg, adapter_name="a0")
        for i in range(1, n_adapters):
            pm.add_adapter(f"a{i}", cfg)
        randomize(pm)
        pm.eval()
        names = [f"a{i}" for i in range(n_adapters)]
        for T in (1, 64):
            ids = torch.randint(0, 8000, (n_adapters, T), generator=torch.Generator().manual_seed(1))
            repeat = 5 if quick else (30 if T == 1 else 10)
            with torch.inference_mode():
                base, mixed, ratio = paired(lambda: plain(input_ids=ids),
                                            lambda: pm(input_ids=ids, adapter_names=names), repeat)
            rows.append({"bench": f"mixed batch, 32 adapters, T={T}", "lib": lib_name, "base_s": base, "s": mixed,
                         "ratio": ratio})
        del pm, model
    return rows


def bench_overhead(quick: bool) -> list[dict]:
    """One adapter (r=16 all-linear): unmerged and merged forward vs the base forward."""
    rows = []
    for lib_name, lib in libs().items():
        plain = llama()  # the base model with no adapter code at all (merging writes into it too)
        model = sharing(plain)
        pm = lib.get_peft_model(model, lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        randomize(pm)
        pm.eval()
        for B, T in ((8, 128), (32, 1)):
            ids = torch.randint(0, 8000, (B, T), generator=torch.Generator().manual_seed(2))
            repeat = 5 if quick else (80 if T == 1 else 24)
            with torch.inference_mode():
                base, unmerged, ratio = paired(lambda: plain(input_ids=ids), lambda: pm(input_ids=ids), repeat)
                pm.merge_adapter()
                base2, merged, ratio2 = paired(lambda: plain(input_ids=ids), lambda: pm(input_ids=ids), repeat)
                pm.unmerge_adapter()
            rows.append({"bench": f"one adapter unmerged, {B}x{T}", "lib": lib_name, "base_s": base, "s": unmerged,
                         "ratio": ratio})
            rows.append({"bench": f"one adapter merged, {B}x{T}", "lib": lib_name, "base_s": base2, "s": merged,
                         "ratio": ratio2})
    return rows


def bare_ops(layer):
    """A forward computing peftkit LoRA ``layer``'s output (adapter "default") with bare tensor calls:
    ``F.linear``, ``F.linear``, ``addmm_`` on 2-D views, Bᵀ made once. This math written in Python
    the obvious way, with no state checks and no lookups."""
    import torch.nn.functional as F

    W, A = layer.base_layer.weight, layer.lora_A["default"].weight
    Bt, s = layer.lora_B["default"].weight.t(), layer.scaling["default"]

    def forward(x):
        out = F.linear(x, W)
        out.view(-1, out.shape[-1]).addmm_(F.linear(x, A).view(-1, A.shape[0]), Bt, alpha=s)
        return out
    return forward


def bare_mm(layer):
    """The tensor calls of peftkit's no-grad road with none of its checks (the floor for it): the
    (batch, tokens, in) input as one 2-D matrix, ``torch.mm`` on Wᵀ and Aᵀ made once, ``addmm_``
    on Bᵀ, a view back."""
    W, A = layer.base_layer.weight, layer.lora_A["default"].weight
    Wt, At, Bt, s = W.t(), A.t(), layer.lora_B["default"].weight.t(), layer.scaling["default"]
    k, n = W.shape[1], W.shape[0]

    def forward(x):
        b, t, _ = x.shape
        x2 = x.reshape(b * t, k)
        out = torch.mm(x2, Wt)
        out.addmm_(torch.mm(x2, At), Bt, alpha=s)
        return out.view(b, t, n)
    return forward


def bench_floor(quick: bool) -> list[dict]:
    """What one unmerged adapter costs at decode shape (32 x 1) without peftkit's wrapper code: each
    LoRA layer's forward replaced (on the instance, in this benchmark only) by bare tensor ops
    (:func:`bare_ops`; :func:`bare_mm`, the no-grad road's calls), or by one GEMM over ``[W; A]``
    stacked plus one ``addmm``. Compared with peftkit's own layer."""
    import torch.nn.functional as F

    import peftkit
    from peftkit.methods.lora import Linear as LoraLinear

    def fused(layer):
        W, A = layer.base_layer.weight, layer.lora_A["default"].weight
        WA, Bt, s, n = torch.cat([W, A]), layer.lora_B["default"].weight.t(), layer.scaling["default"], W.shape[0]

        def forward(x):
            full = F.linear(x.reshape(-1, x.shape[-1]), WA)
            return torch.addmm(full[:, :n], full[:, n:], Bt, alpha=s).view(*x.shape[:-1], n)
        return forward

    rows = []
    ids = torch.randint(0, 8000, (32, 1), generator=torch.Generator().manual_seed(2))
    repeat = 5 if quick else 80
    for variant in ("peftkit layer", "bare ops", "bare 2-D mm", "fused [W; A]"):
        plain = llama()
        pm = peftkit.get_peft_model(sharing(plain), peftkit.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        randomize(pm)
        pm.eval()
        if variant != "peftkit layer":
            for m in pm.modules():
                if isinstance(m, LoraLinear):
                    m.forward = {"bare ops": bare_ops, "bare 2-D mm": bare_mm, "fused [W; A]": fused}[variant](m)
        with torch.inference_mode():
            base, s, ratio = paired(lambda: plain(input_ids=ids), lambda: pm(input_ids=ids), repeat)
        rows.append({"bench": f"one adapter unmerged, 32x1, {variant}", "lib": "peftkit", "base_s": base, "s": s,
                     "ratio": ratio})
    return rows


def _train_setup(lib_name: str):
    """A LoRA model of ``lib_name`` in training mode and a function running one training step."""
    lib = libs()[lib_name]
    pm = lib.get_peft_model(llama(), lib.LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
    opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
    ids = torch.randint(0, 8000, (8, 128), generator=torch.Generator().manual_seed(3))
    pm.train()

    def step():
        loss = pm(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def _train_child(lib_name: str, steps: int) -> None:
    """Run in a subprocess: training steps, print time per step and peak RSS growth."""
    torch.set_num_threads(THREADS)
    step = _train_setup(lib_name)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = timeit(step, steps, warmup=1)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"step_s": t, "peak_rss_growth_mb": (rss1 - rss0) / 1024, "peak_rss_mb": rss1 / 1024}))


def bench_train(quick: bool) -> list[dict]:
    """Training step time: both libraries' models in this process, steps timed in alternating order
    (:func:`paired`), so that the machine's drift hits both alike. Peak memory: each library alone
    in its own process."""
    peak = {}
    for lib_name in ("peftkit", "peft"):
        out = subprocess.run([sys.executable, __file__, "--train-child", lib_name, "2"], capture_output=True,
                             text=True, check=True)
        peak[lib_name] = json.loads(out.stdout.strip().splitlines()[-1])["peak_rss_mb"]
    t_peer, t_ours, ratio = paired(_train_setup("peft"), _train_setup("peftkit"), 2 if quick else 12, warmup=1)
    return [{"bench": "training step 8x128 (fwd+bwd+AdamW)", "lib": "peftkit", "s": t_ours, "ratio": ratio,
             "peak_rss_mb": peak["peftkit"], "note": "ratio vs peft (median of paired steps)"},
            {"bench": "training step 8x128 (fwd+bwd+AdamW)", "lib": "peft", "s": t_peer, "ratio": 1.0,
             "peak_rss_mb": peak["peft"], "note": "ratio vs peft"}]


def bench_inject(quick: bool) -> list[dict]:
    """get_peft_model on a ~1B-parameter Llama shape built on the meta device."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                      intermediate_size=8192, vocab_size=32000)
    rows = []
    res = {}
    for lib_name, lib in libs().items():
        times = []
        for _ in range(2 if quick else 5):
            with torch.device("meta"):
                model = LlamaForCausalLM(cfg)
            t = time.perf_counter()
            lib.get_peft_model(model, lib.LoraConfig(r=16, target_modules="all-linear"))
            times.append(time.perf_counter() - t)
        res[lib_name] = statistics.median(times)
    n_params = sum(p.numel() for p in model.parameters())
    for lib_name, t in res.items():
        rows.append({"bench": f"get_peft_model, {n_params / 1e9:.2f}B Llama on meta, all-linear r=16", "lib": lib_name,
                     "s": t, "ratio": t / res["peft"], "note": "ratio vs peft"})
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--train-child":
        _train_child(sys.argv[2], int(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--only", default="mixed,overhead,train,inject")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    torch.set_num_threads(THREADS)
    import peft

    import peftkit

    print(f"# peftkit {peftkit.__version__} vs peft {peft.__version__}, torch {torch.__version__}, "
          f"{THREADS} threads, {platform.processor() or platform.machine()}, {os.cpu_count()} cpus")
    rows = []
    for name in args.only.split(","):
        rows += {"mixed": bench_mixed, "overhead": bench_overhead, "train": bench_train, "inject": bench_inject,
                 "floor": bench_floor}[name](
            args.quick)
        print(f"# done {name}", file=sys.stderr)
    print("| benchmark | library | time (ms) | ratio | note |")
    print("|---|---|---|---|---|")
    for r in rows:
        note = r.get("note", "vs base forward" if "base_s" in r else "")
        if "peak_rss_mb" in r:
            note += f"; peak RSS {r['peak_rss_mb']:.0f} MB"
        print(f"| {r['bench']} | {r['lib']} | {r['s'] * 1e3:.2f} | {r['ratio']:.3f} | {note} |")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)


if __name__ == "__main__":
    main()
