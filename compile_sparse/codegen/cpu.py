"""Native CPU kernels (``cpu/*.cpp``), built once per machine with torch's C++ extension loader.

``attention_totals(q, k, v, valid, scale, softcap, top_k)``: causal attention
with each key's total over the attention rows, in one pass (H2O's column sums when ``top_k`` is 0,
HitKV's top-k hits otherwise); the source says how. The KV prefill op calls it for CPU tensors
instead of its torch chunks, whose queries x keys matrices go through memory several times (twice
SDPA's time at 4096 tokens; the kernel keeps each block's rows in L2 and costs about what SDPA does).

The build (about 20 s; a C++ compiler, as Inductor's CPU backend needs, and ninja, a dependency) goes to
``$COMPILE_SPARSE_CACHE/kernels/cpu_<hash>`` (the hash covers the source, torch's version and the
CPU's vector ISA); later processes load the built library. Where it cannot be built, ``available()``
is False after one warning, and the callers keep their torch code.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sysconfig
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from . import ops
from .render import cache_dir

SOURCES = [Path(__file__).parent / "cpu" / "attention_totals.cpp"]
log = logging.getLogger("compile_sparse")

# the at::vec implementation to compile in, by the ISA torch's own CPU kernels use here
ISA_FLAGS = {
    "AVX2": ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2", "-mavx2", "-mfma"],
    "AVX512": ["-DCPU_CAPABILITY=AVX512", "-DCPU_CAPABILITY_AVX512", "-mavx512f", "-mavx512bw", "-mavx512vl",
               "-mavx512dq", "-mfma"],
}


def build_flags(isa: str | None = None) -> list[str]:
    """Compiler flags: -O3 and the vector ISA ``isa`` (by default the one torch reports; scalar
    at::vec for any ISA not in ``ISA_FLAGS``)."""
    isa = isa or torch.backends.cpu.get_cpu_capability()
    return ["-O3", *ISA_FLAGS.get(isa, ["-DCPU_CAPABILITY=DEFAULT"])]


def _ninja_on_path() -> None:
    """torch's extension builder runs ``ninja`` from PATH; the ``ninja`` package (a dependency) puts
    it in this Python's scripts folder, not on PATH when a venv's python runs without activation."""
    scripts = sysconfig.get_path("scripts")
    if shutil.which("ninja") is None and shutil.which("ninja", path=scripts) is not None:
        os.environ["PATH"] = scripts + os.pathsep + os.environ.get("PATH", "")


@functools.lru_cache(maxsize=None)
def available() -> bool:
    """Build (once per machine) and load the kernels: True when ``torch.ops.compile_sparse_cpu`` holds
    them, else False after a warning that says why (the torch code runs instead)."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256()
    for source in SOURCES:
        digest.update(source.read_bytes())
    digest.update(" ".join([torch.__version__, *build_flags()]).encode())
    name = f"compile_sparse_cpu_{digest.hexdigest()[:16]}"
    folder = cache_dir() / f"cpu_{digest.hexdigest()[:16]}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        building = not any(folder.glob("*.so"))
        if building:  # as the GGUF conversion says its one-time work
            log.warning("building compile_sparse's CPU attention kernel in %s (once, about 20 s)", folder)
        start = time.time()
        _ninja_on_path()
        cpp_extension.load(name, [str(s) for s in SOURCES], extra_cflags=build_flags(), build_directory=str(folder),
                           is_python_module=False, verbose=False)
        if building:
            log.warning("built in %.0f s", time.time() - start)
    except Exception as error:  # noqa: BLE001 - any build failure: say it, keep the torch code
        message = (f"compile_sparse's CPU attention kernel could not be built ({type(error).__name__}: "
                   f"{str(error).strip().splitlines()[-1] if str(error).strip() else 'no message'}); H2O and "
                   "HitKV prefills use the torch code instead, about twice SDPA's time at long prompts")
        log.warning(message)
        warnings.warn(message, RuntimeWarning, stacklevel=2)
        return False
    return True


def attention_totals(q: Tensor, k: Tensor, v: Tensor, valid: Tensor | None, scale: float, softcap: float | None,
                     top_k: int) -> tuple[Tensor, Tensor]:
    """Causal attention of q (B, Hq, T, D) over k, v (B, Hkv, T, D) (``valid`` (B, T): the real
    tokens, None: all) and each key's total over the rows (B, Hkv, T): its probabilities summed
    (``top_k`` 0) or the rows whose ``top_k`` largest probabilities it is among. Output fp32
    (B, Hq, T, D), 0 for a padding query. Needs ``available()``."""
    if q.dim() != 4 or k.shape != v.shape or k.shape[0] != q.shape[0] or k.shape[2:] != q.shape[2:] \
            or q.shape[1] % k.shape[1]:
        raise ValueError(f"attention_totals: q (B, Hq, T, D) and k, v (B, Hkv, T, D) with Hkv dividing Hq expected, "
                         f"got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if valid is not None and valid.shape != (q.shape[0], q.shape[2]):
        raise ValueError(f"attention_totals: valid must be (B, T) = {(q.shape[0], q.shape[2])}, got {tuple(valid.shape)}")
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    out, totals = ops.output(q, q.shape), ops.output(q, (q.shape[0], k.shape[1], q.shape[2]))
    torch.ops.compile_sparse_cpu.attention_totals(q, k, v, valid, scale, softcap or 0.0, top_k, out, totals)
    return out, totals
