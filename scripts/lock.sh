#!/usr/bin/env bash
# Refresh requirements.lock: resolve the project's dependencies afresh in a throwaway venv and record
# every resolved version. Run it after changing dependencies in pyproject.toml, then run the tests
# (bash scripts/setup.sh --no-demo && .venv/bin/python -m pytest -q) and commit the lock with them.
#   bash scripts/lock.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
"$PY" -m venv "$tmp/venv"
pip() { "$tmp/venv/bin/python" -m pip "$@"; }
pip install -q --upgrade pip
# The CPU build of torch (see README); its local version label (+cpu) is dropped so the lock also
# resolves against a CUDA build of the same version.
pip install -q "torch==${TORCH_VERSION:-2.13.0}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
pip install -q -e ".[test,report]"
{
  echo "# Every package of a tested environment, resolved by scripts/lock.sh on $(date -u +%Y-%m-%d)."
  echo "# scripts/setup.sh and CI install with it as constraints (pip -c): a set-up months from now gets"
  echo "# these versions. Python $("$tmp/venv/bin/python" -c 'import platform; print(platform.python_version())')."
  pip freeze --exclude-editable | sed -E 's/^(torch==[^+]+)\+.*/\1/' | grep -vE '^(pip|setuptools|wheel)=='
} > requirements.lock
echo "wrote requirements.lock ($(grep -vc '^#' requirements.lock) packages)"
