#!/usr/bin/env bash
# Run the model / generate / backend part of the suite against each supported transformers
# version (default: the oldest and the newest), each in its own virtual environment
# (.venv-transformers-<version>, created once). Everything else is pinned by constraints.txt;
# transformers and the two packages whose versions move with it are left to pip.
#
#   scripts/test-versions.sh                     # 5.17.0 and 5.24.0
#   VERSIONS="5.20.0" scripts/test-versions.sh   # any others
#   scripts/test-versions.sh tests/test_generate.py -k padded   # other pytest arguments
set -euo pipefail
cd "$(dirname "$0")/.."
VERSIONS=${VERSIONS:-"5.17.0 5.24.0"}
PY=${PYTHON:-python3}
TESTS=(tests/test_architectures.py tests/test_generate.py tests/test_ragged.py tests/test_streams.py tests/test_compact_kv.py
       tests/test_backend.py tests/test_end_to_end.py tests/test_fallback.py tests/test_merge_patterns.py tests/passes
       tests/test_guest.py tests/test_compile_options.py tests/test_logs.py)
[ $# -gt 0 ] && TESTS=("$@")
free=$(mktemp)
trap 'rm -f "$free"' EXIT
grep -vE '^(transformers|tokenizers|huggingface-hub)==' constraints.txt > "$free"
status=0
for version in $VERSIONS; do
  venv=.venv-transformers-$version
  [ -x "$venv/bin/python" ] || "$PY" -m venv "$venv"
  "$venv/bin/python" -c "import torch" >/dev/null 2>&1 || "$venv/bin/python" -m pip install --quiet torch==2.13.0
  if ! "$venv/bin/python" -c "import transformers, era_compile, pytest, xdist; assert transformers.__version__ == '$version'" \
      >/dev/null 2>&1; then
    "$venv/bin/python" -m pip install --quiet -c "$free" -e ".[test]" "transformers==$version"
  fi
  echo "=== transformers $version ($("$venv/bin/python" -c 'import torch; print("torch", torch.__version__)'))"
  if "$venv/bin/python" -m pytest -q -p no:cacheprovider -n auto --maxprocesses 4 --dist worksteal "${TESTS[@]}"; then
    echo "=== transformers $version: passed"
  else
    echo "=== transformers $version: FAILED"
    status=1
  fi
done
exit $status
