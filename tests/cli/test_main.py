"""``ngcal`` entry point: a command that cannot import is listed and explains itself."""

from __future__ import annotations

import sys

import pytest

from ngcal.cli import main as cli_main


def test_a_command_whose_module_is_missing_is_listed_and_names_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A broken command entry is not dropped: --help lists it, running it names the module."""
    commands = dict(cli_main.COMMANDS, ghost=("no_such_command_module", "a missing command"))
    monkeypatch.setattr(cli_main, "COMMANDS", commands)
    with pytest.raises(SystemExit):
        cli_main.main(["--help"])
    assert "ghost" in capsys.readouterr().out
    rc = cli_main.main(["ghost", "--any", "flag"])
    err = capsys.readouterr().err
    assert rc == 2
    assert "ngcal.cli.no_such_command_module" in err and "unavailable" in err


def test_a_missing_optional_dependency_names_the_extra_that_brings_it(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: object
) -> None:
    """`ngcal fit` without torch says `pip install "ngcal[offline]"`, with no traceback."""
    monkeypatch.setitem(sys.modules, "torch", None)  # import torch -> ModuleNotFoundError
    rc = cli_main.main(["fit", "--data", str(tmp_path), "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 2
    assert "'torch'" in err and 'pip install "ngcal[offline]"' in err
    assert "Traceback" not in err


def test_every_listed_command_imports() -> None:
    """Each command of the table imports here (the full install): none is a stand-in."""
    import importlib

    for module, _help in cli_main.COMMANDS.values():
        importlib.import_module(f"ngcal.cli.{module}")
