"""Progress on stderr: a bar on a terminal, plain lines at most once a minute in a log, nothing with
--quiet."""

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


@pytest.mark.parametrize("quiet", [False, True])
def test_lines_in_a_log(stderr, monkeypatch, quiet):
    """Without a terminal, a line after an item once ``LINE_EVERY`` seconds have passed (0 here: after
    every item), with a time left when the length is known; none when quiet."""
    monkeypatch.setattr(progress_module, "LINE_EVERY", 0.0)
    terminal = stderr(tty=False, quiet=quiet)
    assert list(progress(range(3), desc="cases")) == [0, 1, 2]
    assert list(progress(iter("ab"), desc="rounds")) == ["a", "b"]
    lines = terminal.getvalue().splitlines()
    if quiet:
        assert lines == []
        return
    assert [line.split(",")[0] for line in lines] == ["cases: 1/3", "cases: 2/3", "cases: 3/3", "rounds: 1/?", "rounds: 2/?"]
    assert all("elapsed" in line for line in lines)
    assert ["left" in line for line in lines] == [True] * 3 + [False] * 2


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
