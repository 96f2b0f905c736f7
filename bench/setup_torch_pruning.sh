#!/usr/bin/env bash
# Torch-Pruning 1.6.1 (PyPI) for bench/prune_quality.py --torch-pruning. --no-deps: it needs only
# torch and numpy, which the venv has; its own pins would move our torch.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/pip install -q --no-deps "torch-pruning==1.6.1"
.venv/bin/python -c "import torch_pruning; print('torch-pruning', torch_pruning.__version__)"
