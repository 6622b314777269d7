#!/usr/bin/env bash
# The GPU checks of issue 10 in one device call: the CUDA tests, then benchmarks/gpu_bench.py.
# Everything it writes goes under $OUT (the device tool brings that folder back).
#
# Before the call, here on the CPU machine (no device time), fetch the two wheels the GPU image
# lacks (it has torch, triton, numpy, xxhash, prometheus-client; not lmdb or zstandard):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#       -d .whl lmdb zstandard
# Then: run(command="bash benchmarks/gpu_session.sh", carry=[".whl"], timeout_s=420)
# and copy $OUT/gpu-data-path.md to benchmarks/results/<date>-<gpu>-gpu-data-path.md.
set -uo pipefail
OUT=${OUT:-/tmp/gpu-session}
mkdir -p "$OUT" /tmp/site /tmp/tk
export PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
fi
# tiercache from this tree; kernels/ under its import name, without installing anything
ln -sfn "$PWD/kernels" /tmp/tk/tiercache_kernels
export PYTHONPATH="$PWD:/tmp/tk:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
  "$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
} 2>&1 | tee "$OUT/env.txt"

timeout 240 "$PY" -m pytest -q -p no:cacheprovider -rs tests/test_cuda.py tests/test_transfer.py 2>&1 | tee "$OUT/tests.log"
tests=${PIPESTATUS[0]}
timeout 180 "$PY" benchmarks/gpu_bench.py --out "$OUT/gpu-data-path.md" ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
bench=${PIPESTATUS[0]}
echo "tests exit $tests, bench exit $bench" | tee -a "$OUT/env.txt"
[ "$tests" = 0 ] && [ "$bench" = 0 ]
