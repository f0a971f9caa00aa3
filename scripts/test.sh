#!/usr/bin/env bash
# Set up if needed, then run the test suite (CPU; GPU tests skip without CUDA), one worker per core
# (up to 4): most of the time is single-threaded Dynamo tracing and compiling.
#
#   scripts/test.sh            # the whole suite: what CI runs, before anything lands
#   scripts/test.sh --fast     # the pass, op and algorithm tests (under 3 minutes): while changing one pass
#   scripts/test.sh tests/test_generate.py -k padded    # any pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
FAST=(tests/passes tests/test_algorithms.py tests/test_definitions.py tests/test_ops.py tests/test_attention_op.py
      tests/test_compact_kv.py tests/test_vllm_config.py)
if [ "${1:-}" = "--fast" ]; then
  shift
  set -- "${FAST[@]}" "$@"
fi
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist worksteal "$@"
