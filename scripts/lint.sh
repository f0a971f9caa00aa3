#!/usr/bin/env bash
# Lint, format and types: what CI runs before the tests (seconds, where the suite takes minutes), and
# what the pre-commit hooks run on a commit. Fix what they find with `.venv/bin/ruff check --fix .`
# and `.venv/bin/ruff format .`; mypy's findings by hand. Configuration: pyproject.toml.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh >/dev/null
.venv/bin/ruff check .
.venv/bin/ruff format --check .
.venv/bin/mypy
