import os
import zlib

import torch

# Triton kernels run under the interpreter on a machine without CUDA; the variable must be set
# before anything imports triton.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

# Under pytest-xdist (the README's `-n 2`) every worker takes one core: Dynamo and Inductor compile
# in one Python thread anyway, and two workers of two threads each would fight over two cores.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no cache entries or recompile counts carried over, and
    Dynamo's process-wide setting that options["strict"] turns on goes back to its default."""
    import torch._dynamo.config as dynamo_config

    torch.compiler.reset()
    with dynamo_config.patch(fail_on_recompile_limit_hit=dynamo_config.fail_on_recompile_limit_hit):
        yield
    torch.compiler.reset()


@pytest.fixture
def gen(request) -> torch.Generator:
    """A generator seeded per test, so every test draws its own fresh inputs."""
    return torch.Generator().manual_seed(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poison_op_outputs(monkeypatch):
    """Every output a kernel op allocates starts poisoned (NaN / 0b10101010), not uninitialized
    (which can hold a previous result). The kernel test modules use it for every test."""
    from compile_sparse.codegen import ops

    from .kernel_helpers import poisoned

    monkeypatch.setattr(ops, "output", lambda like, shape, dtype=None: poisoned(
        tuple(shape), dtype if dtype is not None else like.dtype, like.device))
