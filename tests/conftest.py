import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts carried over."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()
