#!/usr/bin/env bash
# Create the virtual environments `tiercache bench --peers` runs its peers in (benchmarks/.venvs/).
# Each peer gets its own venv so its dependencies never mix with tiercache's. CI never runs this.
#
#   bash benchmarks/setup_peers.sh              # all: baselines, lmcache, sglang
#   bash benchmarks/setup_peers.sh lmcache      # just one
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
venvs="$here/.venvs"
python=${PYTHON:-python3}
torch_spec=${TORCH_SPEC:-torch==2.13.0}
mkdir -p "$venvs"

make_venv() {  # name
  if [ ! -x "$venvs/$1/bin/python" ]; then
    "$python" -m venv "$venvs/$1"
  fi
  "$venvs/$1/bin/pip" install --quiet --upgrade pip
  "$venvs/$1/bin/pip" install --quiet "$torch_spec" numpy
}

setup_baselines() {
  make_venv baselines
  "$venvs/baselines/bin/pip" install --quiet safetensors "$torch_spec"
}

setup_lmcache() {
  make_venv lmcache
  "$venvs/lmcache/bin/pip" install --quiet lmcache==0.5.6 "$torch_spec"
}

setup_sglang() {
  # HiCacheFile is plain Python over torch; the full sglang dependency set (CUDA kernels, servers)
  # is not needed, so install it without deps and add the few pure-Python ones its import chain uses.
  make_venv sglang
  "$venvs/sglang/bin/pip" install --quiet --no-deps sglang==0.5.23
  # shellcheck disable=SC2046  # one package name per line
  "$venvs/sglang/bin/pip" install --quiet "$torch_spec" $(grep -v "^#" "$here/peers/sglang-requirements.txt")
}

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=(baselines lmcache sglang)
for t in "${targets[@]}"; do
  case "$t" in
    baselines|lmcache|sglang) echo "setting up $t in $venvs/$t"; "setup_$t" ;;
    *) echo "unknown peer $t (expected baselines, lmcache or sglang)" >&2; exit 2 ;;
  esac
done
