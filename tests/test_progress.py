"""Progress bars: drawn on stderr only when it is a terminal and --quiet was not given."""

import io
import sys

import pytest

from compile_sparse import progress as progress_module
from compile_sparse.cli import main
from compile_sparse.progress import progress


class _Terminal(io.StringIO):
    """A stderr that says it is a terminal (or not)."""

    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.fixture
def stderr(monkeypatch):
    def use(tty: bool, quiet: bool = False) -> _Terminal:
        terminal = _Terminal(tty)
        monkeypatch.setattr(sys, "stderr", terminal)
        monkeypatch.setattr(progress_module, "QUIET", quiet)
        return terminal

    return use


def test_a_bar_is_drawn_on_a_terminal(stderr):
    terminal = stderr(tty=True)
    assert list(progress(range(3), desc="documents", unit="doc")) == [0, 1, 2]
    drawn = terminal.getvalue()
    assert "documents:" in drawn and "0/3" in drawn and "doc/s" in drawn


@pytest.mark.parametrize("tty, quiet", [(False, False), (True, True), (False, True)])
def test_no_bar_without_a_terminal_or_when_quiet(stderr, tty, quiet):
    terminal = stderr(tty=tty, quiet=quiet)
    assert list(progress(range(3), desc="documents")) == [0, 1, 2]
    assert terminal.getvalue() == ""


def test_the_cli_quiet_switch(monkeypatch, capsys):
    monkeypatch.setattr(progress_module, "QUIET", False)
    with pytest.raises(SystemExit):
        main(["eval", "--help"])
    assert "--quiet" in capsys.readouterr().out
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(["inspect", "tiny-llama", "--seq-len", "8", "--quiet"]) == 0
    assert progress_module.QUIET and not progress_module.enabled()
    assert main(["inspect", "tiny-llama", "--seq-len", "8"]) == 0
    assert not progress_module.QUIET and progress_module.enabled()  # each run sets it afresh
