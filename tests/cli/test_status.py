"""``ngcal status``: readable text, and JSON that is safe to pipe into ``head``."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest


@pytest.fixture
def state_dir(tmp_path: Path) -> Path:
    from ngcal.daemon.store import Store

    Store(tmp_path).close()  # a fresh state database, as the daemon creates it
    return tmp_path


def test_text_has_no_raw_none(state_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """An empty outbox prints no 'oldest None s'; no verdicts print 'none'."""
    from ngcal.cli.main import main

    assert main(["status", "--state-dir", str(state_dir)]) == 0
    out = capsys.readouterr().out
    assert "None" not in out and "verdicts: none" in out


def test_json_into_a_closed_pipe_is_not_a_traceback(state_dir: Path) -> None:
    """`ngcal status --json | head -0`: the reader is gone before the write; exit 0, quiet."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "ngcal.cli.main", "status", "--state-dir", str(state_dir), "--json"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # like `head` exiting at once
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=60) == 0, err
    assert "Traceback" not in err and "BrokenPipeError" not in err
