import os

import torch

# Triton kernels run under the interpreter on a machine without CUDA; the variable must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts carried over."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()
