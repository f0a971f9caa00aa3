#!/usr/bin/env bash
# Set up if needed, then run the test suite (CPU; GPU tests skip without CUDA), one worker
# per core (up to 4): most of the time is single-threaded Dynamo tracing and compiling.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist worksteal "$@"
