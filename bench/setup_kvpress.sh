#!/usr/bin/env bash
# Installs kvpress 0.5.5 beside our venv for bench/kv_quality.py's kvpress rows.
# kvpress pins transformers<5.3, so it goes in with --no-deps; its runtime imports come next,
# constrained to the versions already installed so nothing of ours moves.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
$PY -m pip freeze | grep -v '^-e' > /tmp/compile_sparse_constraints.txt
$PY -m pip install -q --no-deps kvpress==0.5.5
$PY -m pip install -q -c /tmp/compile_sparse_constraints.txt cachetools datasets "pandas<3" fire
$PY -c "import kvpress; print('kvpress', kvpress.__version__ if hasattr(kvpress, '__version__') else '0.5.5')"
