"""LoRA on a GPU: peftkit side by side with Hugging Face PEFT in one process.

    python bench/bench_gpu.py [--quick] [--tiny] [--device cuda|cpu] [--only train,nf4,overhead,mixed]
                              [--out results.json] [--budget SECONDS]

Model: a Llama of about 1B parameters with random weights (hidden 2048, 16 layers, 16 heads,
intermediate 5632, vocab 32000), bf16. ``--tiny`` shrinks it (and the batches) to run anywhere in
seconds, e.g. ``--tiny --device cpu`` as a smoke test. Sections:

* ``train``: one LoRA training step (r=16, alpha=32, all linear layers, fp32 adapters over the bf16
  base): forward + backward + AdamW on a batch of 8 x 512 tokens. Time per step (median of paired
  steps of the two libraries, in alternating order) and the peak GPU memory of one step.
* ``nf4``: the same step over a 4-bit NF4 base: peftkit ``quantize_model(bits=4)`` against peft
  over transformers + bitsandbytes ``BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")``
  loaded from a saved copy of the same random weights. No gradient checkpointing on either side.
* ``overhead``: one unmerged adapter (r=16, all linear) forward against the base forward, 32 rows,
  T=1 (decode-shaped) and T=128.
* ``mixed``: inference forward of a mixed-adapter batch, 32 LoRA adapters (r=16, all linear) on 32
  rows (each row its own adapter; and 32 rows over 4 adapters), T=1 (decode-shaped) and T=128,
  against the base model's forward on the same rows: peftkit and peft both take ``adapter_names=``.
  Adapters in fp32 (both libraries' default over a bf16 base), then cast to bf16 (not with --quick).

Times are wall-clock with ``torch.cuda.synchronize()`` after every call, the median over repeats
after warm-up; each pair of functions is timed in alternating order (ABBA...) so that clock and
thermal drift hit both alike, and the ratio is the median of the per-pair ratios. Peak memory is
``torch.cuda.max_memory_allocated`` during one step, after ``reset_peak_memory_stats``: it counts
the shared bf16 base weights and both libraries' adapters, so compare the "step" column, the
peak minus the memory held before the step (activations, gradients, optimizer work space).

Prints a Markdown table; ``--out`` also writes the rows as JSON (rewritten after every section, so
a run cut short keeps what it measured).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from typing import Any, Callable, Optional

import torch

SIZES = {
    "1b": {"model": dict(hidden_size=2048, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
                         intermediate_size=5632, vocab_size=32000, max_position_embeddings=2048),
           "train": (8, 512), "decode_T": (1, 128)},
    "tiny": {"model": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                           intermediate_size=128, vocab_size=512, max_position_embeddings=256),
             "train": (2, 32), "decode_T": (1, 8)},
}
ROWS_MIXED = 32
N_ADAPTERS = 32
LORA = dict(r=16, lora_alpha=32, target_modules="all-linear")


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.device = torch.device(args.device)
        self.cuda = self.device.type == "cuda"
        self.size = SIZES["tiny" if args.tiny else "1b"]
        self.quick = args.quick
        self.t0 = time.perf_counter()
        self.rows: list[dict] = []
        self.env: dict[str, Any] = {}
        import peftkit

        self.libs: dict[str, Any] = {"peftkit": peftkit}
        try:
            import peft

            self.libs["peft"] = peft
        except Exception as exc:  # noqa: BLE001
            print(f"# Hugging Face peft is not importable ({exc}): peftkit rows only", file=sys.stderr)

    # -- plumbing ------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def free(self) -> None:
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def build(self, dtype: torch.dtype = torch.bfloat16):
        """The random-weight Llama, built directly on the device (fp32 init, then cast)."""
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(**self.size["model"])
        with torch.device(self.device):
            model = LlamaForCausalLM(cfg)
        return model.to(dtype).eval()

    def sharing(self, plain):
        """A second model object whose parameters and buffers are ``plain``'s own tensors (no copy):
        adapter models and the base they are timed against read the same weight memory."""
        from transformers import LlamaForCausalLM

        prev = torch.get_default_dtype()
        torch.set_default_dtype(next(plain.parameters()).dtype)
        try:
            with torch.device(self.device):
                model = LlamaForCausalLM(plain.config)
        finally:
            torch.set_default_dtype(prev)
        model.load_state_dict(plain.state_dict(), assign=True)
        for name, buf in plain.named_buffers():
            owner, _, attr = name.rpartition(".")
            model.get_submodule(owner)._buffers[attr] = buf
        return model.eval()

    def ids(self, batch: int, length: int, seed: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randint(0, self.size["model"]["vocab_size"], (batch, length), generator=g).to(self.device)

    def randomize_b(self, model, seed: int = 0) -> None:
        """Non-zero lora_B (an adapter at init is a no-op, which some code paths could skip)."""
        g = torch.Generator(device=self.device).manual_seed(seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.copy_(torch.randn(p.shape, generator=g, device=self.device, dtype=p.dtype) * 0.01)

    def timed(self, fn: Callable[[], Any]) -> float:
        t = time.perf_counter()
        fn()
        self.sync()
        return time.perf_counter() - t

    def paired(self, fn_a, fn_b, repeat: int, warmup: int = 2) -> tuple[float, float, float]:
        """Median times of two functions timed in alternating order (AB, BA, AB, ...), and the median
        of the per-pair ratios b / a."""
        for _ in range(warmup):
            fn_a()
            fn_b()
        self.sync()
        ta, tb = [], []
        for i in range(repeat):
            order = (("a", fn_a), ("b", fn_b)) if i % 2 == 0 else (("b", fn_b), ("a", fn_a))
            pair = {key: self.timed(fn) for key, fn in order}
            ta.append(pair["a"])
            tb.append(pair["b"])
        return statistics.median(ta), statistics.median(tb), statistics.median(b / a for a, b in zip(ta, tb))

    def step_memory(self, step: Callable[[], Any]) -> tuple[Optional[float], Optional[float]]:
        """(peak GiB during one call of ``step``, peak minus the memory allocated before it)."""
        if not self.cuda:
            step()
            return None, None
        self.free()
        self.sync()
        torch.cuda.reset_peak_memory_stats(self.device)
        before = torch.cuda.memory_allocated(self.device)
        step()
        self.sync()
        peak = torch.cuda.max_memory_allocated(self.device)
        return peak / 2**30, (peak - before) / 2**30

    def add(self, **row: Any) -> None:
        self.rows.append(row)

    def write(self) -> None:
        if not self.args.out:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.args.out)), exist_ok=True)
        tmp = self.args.out + ".tmp"
        with open(tmp, "w") as fh:
            json.dump({"env": self.env, "rows": self.rows, "elapsed_s": self.elapsed()}, fh, indent=1)
        os.replace(tmp, self.args.out)

    def lora_config(self, lib, **extra):
        return lib.LoraConfig(**LORA, task_type="CAUSAL_LM", **extra)

    # -- sections ------------------------------------------------------------------------------
    def train_step(self, pm, ids: torch.Tensor, losses: list):
        opt = torch.optim.AdamW([p for p in pm.parameters() if p.requires_grad], lr=1e-4)
        pm.train()

        def step():
            loss = pm(input_ids=ids, labels=ids).loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if len(losses) < 1:
                losses.append(float(loss))  # the first step's loss: the base model's (lora_B = 0)
        return step

    def compare_steps(self, bench: str, steps: dict[str, Callable], repeat: int, note: str,
                      first_loss: dict[str, list]) -> None:
        for fn in steps.values():  # warm-up: kernels, allocator, AdamW states
            fn()
            fn()
        mem = {name: self.step_memory(fn) for name, fn in steps.items()}
        if "peft" in steps:
            t_peer, t_ours, ratio = self.paired(steps["peft"], steps["peftkit"], repeat, warmup=1)
            times = {"peftkit": (t_ours, ratio), "peft": (t_peer, 1.0)}
        else:
            t_ours = statistics.median(self.timed(steps["peftkit"]) for _ in range(repeat))
            times = {"peftkit": (t_ours, None)}
        for name, (t, ratio) in times.items():
            peak, step = mem[name]
            self.add(bench=bench, lib=name, s=t, ratio=ratio, peak_gib=peak, step_gib=step,
                     first_loss=first_loss[name][0] if first_loss[name] else None,
                     note=note if ratio is not None else note + "; no peft to compare")

    def bench_train(self) -> None:
        B, T = self.size["train"]
        plain = self.build()
        ids = self.ids(B, T, seed=3)
        models, steps, losses = {}, {}, {}
        for name, lib in self.libs.items():
            models[name] = lib.get_peft_model(self.sharing(plain), self.lora_config(lib))
            losses[name] = []
            steps[name] = self.train_step(models[name], ids, losses[name])
        repeat = 5 if self.quick else 20
        self.compare_steps(f"LoRA training step, bf16 base, {B}x{T}", steps, repeat, "ratio vs peft", losses)
        del models, steps, plain
        self.free()

    def bench_nf4(self) -> None:
        B, T = self.size["train"]
        plain = self.build()
        ids = self.ids(B, T, seed=4)
        steps, losses, keep = {}, {}, []
        import peftkit

        try:
            import bitsandbytes  # noqa: F401

            has_bnb = True
        except Exception as exc:  # noqa: BLE001
            has_bnb = False
            print(f"# bitsandbytes is not importable ({exc}): peftkit's pure-PyTorch NF4 only, no peft row",
                  file=sys.stderr)
        q = peftkit.quantize_model(self.sharing(plain), bits=4)
        pm = peftkit.get_peft_model(q, self.lora_config(peftkit))
        losses["peftkit"] = []
        steps["peftkit"] = self.train_step(pm, ids, losses["peftkit"])
        keep.append(pm)
        folder = None
        if has_bnb and "peft" in self.libs:
            import transformers

            peft = self.libs["peft"]
            folder = tempfile.mkdtemp(prefix="bench_gpu_llama_", dir="/tmp")
            plain.save_pretrained(folder)
            bnb_cfg = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                      bnb_4bit_compute_dtype=torch.bfloat16)
            base = transformers.AutoModelForCausalLM.from_pretrained(
                folder, quantization_config=bnb_cfg, dtype=torch.bfloat16,
                device_map={"": self.device.index or 0} if self.cuda else "cpu")
            ppm = peft.get_peft_model(base, self.lora_config(peft))
            losses["peft"] = []
            steps["peft"] = self.train_step(ppm, ids, losses["peft"])
            keep.append(ppm)
        del plain
        self.free()
        note = "ratio vs peft+bitsandbytes" if "peft" in steps else (
            "bitsandbytes kernel" if has_bnb else "bitsandbytes not installed: pure-PyTorch NF4")
        repeat = 3 if self.quick else 12
        self.compare_steps(f"QLoRA training step, NF4 base (bf16 compute), {B}x{T}", steps, repeat, note, losses)
        del keep, steps, pm
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        self.free()

    def bench_mixed(self) -> None:
        plain = self.build()
        names = [f"a{i}" for i in range(N_ADAPTERS)]
        layouts = {"32 adapters on 32 rows": names[:ROWS_MIXED],
                   "4 adapters on 32 rows": [names[i % 4] for i in range(ROWS_MIXED)]}
        for lib_name, lib in self.libs.items():
            t_build = time.perf_counter()
            pm = lib.get_peft_model(self.sharing(plain), self.lora_config(lib), adapter_name=names[0])
            for name in names[1:]:
                pm.add_adapter(name, self.lora_config(lib))
            self.randomize_b(pm)
            pm.eval()
            t_build = time.perf_counter() - t_build
            # adapters in fp32 (both libraries' default over a bf16 base), then cast to bf16 (serving)
            for adapter_dtype in ((torch.float32,) if self.quick else (torch.float32, torch.bfloat16)):
                if adapter_dtype != torch.float32:
                    pm.to(adapter_dtype)
                for T in self.size["decode_T"]:
                    ids = self.ids(ROWS_MIXED, T, seed=1)
                    for layout, rows in layouts.items():
                        if self.quick and layout.startswith("4"):
                            continue
                        bench = f"mixed batch, {layout}, T={T}, {str(adapter_dtype)[6:]} adapters"
                        if self.elapsed() > self.args.budget:
                            self.add(bench=bench, lib=lib_name, s=None, ratio=None,
                                     note="skipped: over the time budget")
                            continue
                        repeat = (5 if T == 1 else 3) if self.quick else (20 if T == 1 else 10)
                        try:
                            with torch.inference_mode():
                                base, mixed, ratio = self.paired(lambda: plain(input_ids=ids),
                                                                 lambda: pm(input_ids=ids, adapter_names=rows), repeat)
                        except Exception as exc:  # noqa: BLE001 - keep the other rows
                            self.add(bench=bench, lib=lib_name, s=None, ratio=None,
                                     note=f"failed: {type(exc).__name__}: {exc}"[:300])
                            print(f"# {bench} / {lib_name} failed: {exc!r}", file=sys.stderr)
                            continue
                        self.add(bench=bench, lib=lib_name, s=mixed, base_s=base, ratio=ratio,
                                 note=f"vs base forward ({base * 1e3:.2f} ms); {N_ADAPTERS} adapters added in "
                                      f"{t_build:.1f} s")
            del pm
            self.free()
        del plain
        self.free()

    def bench_overhead(self) -> None:
        plain = self.build()
        for lib_name, lib in self.libs.items():
            pm = lib.get_peft_model(self.sharing(plain), self.lora_config(lib))
            self.randomize_b(pm)
            pm.eval()
            for T in self.size["decode_T"]:
                ids = self.ids(ROWS_MIXED, T, seed=2)
                repeat = 5 if self.quick else (40 if T == 1 else 15)
                with torch.inference_mode():
                    base, s, ratio = self.paired(lambda: plain(input_ids=ids), lambda: pm(input_ids=ids), repeat)
                self.add(bench=f"one adapter unmerged, {ROWS_MIXED}x{T}", lib=lib_name, s=s, base_s=base, ratio=ratio,
                         note=f"vs base forward ({base * 1e3:.2f} ms)")
            del pm
            self.free()
        del plain
        self.free()

    # -- driver --------------------------------------------------------------------------------
    def environment(self) -> None:
        import transformers

        import peftkit

        env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                               "transformers": transformers.__version__, "peftkit": peftkit.__version__,
                               "peft": getattr(self.libs.get("peft"), "__version__", None),
                               "device": str(self.device), "size": "tiny" if self.args.tiny else "1b",
                               "quick": self.quick}
        try:
            import bitsandbytes

            env["bitsandbytes"] = bitsandbytes.__version__
        except Exception:  # noqa: BLE001
            env["bitsandbytes"] = None
        if self.cuda:
            env["gpu"] = torch.cuda.get_device_name(self.device)
            env["cuda"] = torch.version.cuda
            env["capability"] = ".".join(map(str, torch.cuda.get_device_capability(self.device)))
        else:
            env["cpu"] = platform.processor() or platform.machine()
            env["threads"] = torch.get_num_threads()
        self.env = env
        print("# " + ", ".join(f"{k} {v}" for k, v in env.items()))

    def run(self) -> None:
        self.environment()
        sections = {"train": self.bench_train, "nf4": self.bench_nf4, "overhead": self.bench_overhead,
                    "mixed": self.bench_mixed}
        for name in self.args.only.split(","):
            if self.elapsed() > self.args.budget:
                print(f"# skipped {name}: over the time budget ({self.elapsed():.0f} s > {self.args.budget} s)",
                      file=sys.stderr)
                self.add(bench=name, lib="-", s=None, ratio=None, note="skipped: over the time budget")
                continue
            t = time.perf_counter()
            try:
                sections[name]()
            except Exception as exc:  # noqa: BLE001 - one failing section must not lose the others
                import traceback

                traceback.print_exc()
                self.add(bench=name, lib="-", s=None, ratio=None, note=f"failed: {type(exc).__name__}: {exc}"[:300])
                self.free()
            print(f"# done {name} in {time.perf_counter() - t:.1f} s (total {self.elapsed():.0f} s)", file=sys.stderr)
            self.write()
        self.table()
        self.write()

    def table(self) -> None:
        print("| benchmark | library | time (ms) | ratio | peak GiB | step GiB | note |")
        print("|---|---|---|---|---|---|---|")

        def fmt(v: Any, spec: str) -> str:
            return "" if v is None else format(v, spec)
        for r in self.rows:
            s = "" if r.get("s") is None else f"{r['s'] * 1e3:.2f}"
            print(f"| {r['bench']} | {r['lib']} | {s} | {fmt(r.get('ratio'), '.3f')} | {fmt(r.get('peak_gib'), '.2f')} "
                  f"| {fmt(r.get('step_gib'), '.2f')} | {r.get('note', '')} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke run)")
    parser.add_argument("--tiny", action="store_true", help="a tiny model and batches (a smoke run, e.g. on CPU)")
    parser.add_argument("--only", default="train,nf4,overhead,mixed")
    parser.add_argument("--out", help="write the rows as JSON to this file")
    parser.add_argument("--budget", type=float, default=210.0,
                        help="seconds; sections that would start later than this are skipped")
    args = parser.parse_args()
    if not args.device.startswith("cuda"):
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    warnings.filterwarnings("ignore")
    Bench(args).run()


if __name__ == "__main__":
    main()
