"""The wheel: built offline from the source, installed into a fresh venv that already has torch and
the other dependencies, and run from outside the source tree."""

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])  # this venv's: torch, transformers, ...


def _run(*args, cwd: Path, timeout: int = 180) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    done = subprocess.run([str(a) for a in args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(map(str, args))} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    return done


def _shared_dependencies(target: Path) -> Path:
    """A folder of links to everything in this venv's site-packages but compile_sparse itself (its
    editable install), so the scratch venv sees the same torch & co. and installs the package anew."""
    target.mkdir()
    for entry in SITE_PACKAGES.iterdir():
        name = entry.name.lower()
        if not name.startswith(("compile_sparse", "__editable__")):
            (target / entry.name).symlink_to(entry)
    return target


@pytest.mark.slow
def test_the_wheel_installs_into_a_venv_with_torch_and_runs_outside_the_tree(tmp_path):
    # build from a copy of the sources, so that the build leaves nothing in the checkout
    source = tmp_path / "source"
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(ROOT / "compile_sparse", source / "compile_sparse", ignore=ignore)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    _run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
         tmp_path / "dist", source, cwd=tmp_path)
    wheel, = (tmp_path / "dist").glob("compile_sparse-*.whl")

    # every file of the package is in the wheel: the modules and the kernel templates (package data)
    packaged = set(zipfile.ZipFile(wheel).namelist())
    sources = {p.relative_to(source).as_posix() for p in (source / "compile_sparse").rglob("*") if p.is_file()}
    assert "compile_sparse/codegen/templates/decode_attention.py" in sources
    assert sources - packaged == set()

    # a fresh venv without pip of its own (its bundled setuptools would shadow the one torch needs):
    # this venv's pip installs into it
    venv = tmp_path / "venv"
    _run(sys.executable, "-m", "venv", "--without-pip", venv, cwd=tmp_path)
    python = venv / "bin" / "python"
    scratch_site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])",
                             cwd=tmp_path).stdout.strip())
    (scratch_site / "shared_dependencies.pth").write_text(f"{_shared_dependencies(tmp_path / 'shared')}\n")
    installed = _run(sys.executable, "-m", "pip", "--python", python, "install", "--no-index", wheel, cwd=tmp_path).stdout
    assert "Requirement already satisfied: torch" in installed  # the same torch, nothing downloaded
    assert "Successfully installed compile-sparse-" in installed

    where = _run(python, "-c", "import compile_sparse; print(compile_sparse.__file__)", cwd=tmp_path).stdout.strip()
    assert Path(where).parent == scratch_site / "compile_sparse"  # the wheel's copy, not the source tree
    report = _run(venv / "bin" / "compile-sparse", "inspect", "tiny-llama", "--seq-len", "8", cwd=tmp_path).stdout
    assert "compile_sparse report: 1 graph(s), 2 attention sites, 2 MLP sites, 0 skipped" in report
    assert "KV cache handed back" in report
