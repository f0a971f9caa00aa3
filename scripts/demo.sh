#!/usr/bin/env bash
# Set up if needed, then compile the tiny random-init LLaVA with the ERA backend and print the report.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/era-compile demo "$@"
