"""Run Hugging Face PEFT's own test suite against peftkit (and against PEFT itself, for the baseline).

    python bench/hf_peft_suite.py --tests /path/to/peft-0.21.2/tests --mode peft   --out base.xml
    python bench/hf_peft_suite.py --tests /path/to/peft-0.21.2/tests --mode peftkit --out kit.xml
    python bench/hf_peft_suite.py --compare base.xml kit.xml

The tests come from PEFT's source distribution (``pip download --no-binary=:all: --no-deps peft==0.21.2``);
they are not part of this repository. ``--mode peft`` runs them unchanged, offline: the tests that pass
there are the denominator (tests of methods peftkit does not implement are deselected in both runs).
``--mode peftkit`` loads bench/hf_peft_overlay.py, which replaces each PEFT name peftkit offers with
peftkit's object. ``--compare`` prints the pass rate and the failures grouped by their first error line.
Extra arguments after ``--`` go to pytest (``-k``, ``-x``, file names).
"""

from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
# PEFT's test files that can run offline (the others load models from the Hub for every test)
FILES = [
    "test_config.py", "test_custom_models.py", "test_helpers.py", "test_initialization.py", "test_integrations.py",
    "test_lora_variants.py", "test_loraplus.py", "test_low_level_api.py", "test_mapping.py", "test_mixed.py",
    "test_other.py", "test_target_parameters.py", "test_trainable_tokens.py", "test_tuners_utils.py",
]


def _env(args: argparse.Namespace) -> dict[str, str]:
    return dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               PYTHONPATH=os.pathsep.join(p for p in [str(HERE), args.extra_path, os.environ.get("PYTHONPATH")] if p))


def sample_ids(args: argparse.Namespace, tests: Path) -> list[str]:
    """``args.sample`` test ids drawn with ``args.seed`` from the tests PEFT's files collect (overlay off)."""
    import random

    env = dict(_env(args), PEFTKIT_OVERLAY_OFF="1")
    files = [str(tests / f) for f in FILES if (tests / f).exists()]
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=",
                          "-p", "hf_peft_overlay", "--collect-only", *files], cwd=tests.parent, env=env,
                         capture_output=True, text=True).stdout
    ids = sorted(line for line in out.splitlines() if "::" in line)
    return sorted(random.Random(args.seed).sample(ids, min(args.sample, len(ids))))


def run(args: argparse.Namespace, extra: list[str]) -> int:
    tests = Path(args.tests).resolve()
    env = _env(args)
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=", "--timeout", str(args.timeout),
           f"--junitxml={Path(args.out).resolve()}", "-n", str(args.workers), "-p", "hf_peft_overlay"]
    if args.mode == "peft":
        env["PEFTKIT_OVERLAY_OFF"] = "1"
    files = [str(tests / f) for f in FILES if (tests / f).exists()] if not extra else []
    if args.sample:
        files = sample_ids(args, tests)
    return subprocess.call(cmd + files + extra, cwd=tests.parent, env=env)


def _results(path: str) -> dict[str, tuple[str, str]]:
    out = {}
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        status, msg = "passed", ""
        for tag in ("failure", "error", "skipped"):
            node = case.find(tag)
            if node is not None:
                status, msg = tag, (node.get("message") or (node.text or ""))
                break
        out[name] = (status, msg)
    return out


# A failure whose message says that the test needs a method or a LoRA variant peftkit does not
# implement (its config class is PEFT's, its peft_type unknown, or the LoRA field is refused): such
# tests are not counted (the parametrized test ids do not always name the method, so they are found
# by what peftkit answers).
UNIMPLEMENTED = re.compile(
    r"must be a PeftConfig, got \w+Config|Unknown peft_type|is not supported by peftkit; leave it"
    r"|init_lora_weights='\w+' is not supported|combination_type '\w+' is not supported"
    r"|^KeyError: '[A-Z0-9_]+'$")  # a PEFT_TYPE_TO_* lookup of another method's peft_type


def compare(base: str, kit: str, show: int) -> None:
    b, k = _results(base), _results(kit)
    skipped = {n for n, (s, m) in k.items() if s in ("failure", "error") and UNIMPLEMENTED.search(m)}
    print(f"{len(skipped)} tests need a method or LoRA variant peftkit does not implement (not counted)")
    denom = [n for n, (s, _) in b.items() if s == "passed" and n not in skipped]
    passed = [n for n in denom if k.get(n, ("missing", ""))[0] == "passed"]
    print(f"PEFT passes {len(denom)} of {len(b)}; peftkit passes {len(passed)} of those "
          f"({100 * len(passed) / max(1, len(denom)):.1f}%)")
    groups: dict[str, list[str]] = collections.defaultdict(list)
    for n in denom:
        status, msg = k.get(n, ("missing", "not run"))
        if status != "passed":
            first = re.sub(r"0x[0-9a-f]+", "0x.", (msg.strip().splitlines() or [""])[0])[:160]
            groups[f"{status}: {first}"].append(n)
    for key, names in sorted(groups.items(), key=lambda kv: -len(kv[1]))[:show]:
        print(f"{len(names):5d}  {key}\n       e.g. {names[0]}")


def main() -> int:
    argv = sys.argv[1:]
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[:argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tests")
    p.add_argument("--mode", choices=["peft", "peftkit"], default="peftkit")
    p.add_argument("--out", default="hf_peft_suite.xml")
    p.add_argument("--workers", default="2")
    p.add_argument("--timeout", default="300")
    p.add_argument("--extra-path", default="", help="a folder added to PYTHONPATH (e.g. parameterized, scipy)")
    p.add_argument("--sample", type=int, default=0, help="run a random sample of this many tests (same for both modes)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--compare", nargs=2, metavar=("BASE_XML", "KIT_XML"))
    p.add_argument("--show", type=int, default=60)
    args = p.parse_args(argv)
    if args.compare:
        compare(*args.compare, args.show)
        return 0
    if not args.tests:
        p.error("--tests is required unless --compare")
    return run(args, extra)


if __name__ == "__main__":
    sys.exit(main())
