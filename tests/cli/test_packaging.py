"""Packaging guards: the wheel holds every part, bare names fail, edge parts are torch-free."""

from __future__ import annotations

import ast
import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import tomllib

REPO = Path(__file__).resolve().parents[2]
PARTS = ("core", "patchcore", "generation", "export", "calibration", "daemon", "cli")


def _package_folders() -> dict[str, str]:
    """Every folder with an ``__init__.py`` under the parts, as ``ngcal.<dotted>`` -> folder."""
    found = {}
    for part in PARTS:
        for init in (REPO / part).rglob("__init__.py"):
            rel = init.parent.relative_to(REPO)
            found["ngcal." + ".".join(rel.parts)] = rel.as_posix()
    return found


def _pyproject() -> dict:
    with open(REPO / "pyproject.toml", "rb") as f:
        return tomllib.load(f)


def test_package_list_matches_folders() -> None:
    """pyproject's explicit package list and package-dir name exactly the folders that exist."""
    setuptools_cfg = _pyproject()["tool"]["setuptools"]
    folders = _package_folders()
    assert sorted(setuptools_cfg["packages"]) == sorted(folders)
    assert setuptools_cfg["package-dir"] == folders


def test_wheel_contains_every_subpackage(tmp_path: Path) -> None:
    """A built wheel has each subpackage's __init__.py and py.typed (not just the editable)."""
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(REPO),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = tmp_path.glob("ngcal-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for dotted in _package_folders():
        base = dotted.replace(".", "/")
        assert f"{base}/__init__.py" in names, f"{dotted} missing from the wheel"
        assert f"{base}/py.typed" in names, f"{dotted}/py.typed missing from the wheel"
    assert not any(n.startswith(("tests/", "benchmarks/", "core/", "daemon/")) for n in names)


@pytest.mark.parametrize("bare", PARTS)
def test_bare_names_do_not_import(bare: str, tmp_path: Path) -> None:
    """`import daemon` (and the other folder names) fails: parts exist only under ngcal."""
    assert importlib.util.find_spec(bare) is None
    proc = subprocess.run(
        [sys.executable, "-c", f"import {bare}"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0 and "ModuleNotFoundError" in proc.stderr


_TORCH_FREE_CHECK = """
import importlib, pkgutil, sys
class _BlockTorch:
    # meta-path finder that makes torch unimportable, as on an edge box without it
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"{name} is blocked in this check")
        return None
sys.meta_path.insert(0, _BlockTorch())
failed = []
for pkg in ("ngcal.core", "ngcal.calibration", "ngcal.daemon"):
    mod = importlib.import_module(pkg)
    for info in pkgutil.walk_packages(mod.__path__, pkg + "."):
        try:
            importlib.import_module(info.name)
        except ImportError as e:
            failed.append(f"{info.name}: {e}")
from ngcal.cli.main import build_parser
build_parser()
print("\\n".join(failed))
sys.exit(1 if failed else 0)
"""


def test_edge_parts_import_without_torch(tmp_path: Path) -> None:
    """Every module of ngcal.core, ngcal.calibration and ngcal.daemon, and the
    CLI parser, import with torch made unimportable."""
    proc = subprocess.run(
        [sys.executable, "-c", _TORCH_FREE_CHECK],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def _imported_parts(folder: Path) -> set[str]:
    parts: set[str] = set()
    for py in folder.rglob("*.py"):
        for node in ast.walk(ast.parse(py.read_text(), filename=str(py))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                bits = n.split(".")
                if bits[0] == "ngcal" and len(bits) > 1:
                    parts.add(bits[1])
    return parts


@pytest.mark.parametrize(
    ("part", "allowed"),
    [
        ("core", {"core"}),
        ("patchcore", {"core", "patchcore"}),
        ("generation", {"core", "patchcore", "generation"}),
        ("export", {"core", "patchcore", "export"}),
        ("calibration", {"core", "calibration"}),
        ("daemon", {"core", "calibration", "daemon"}),
    ],
)
def test_import_boundaries(part: str, allowed: set[str]) -> None:
    """Parts exchange files, not imports: each imports only the parts the design allows."""
    used = _imported_parts(REPO / part)
    assert used <= allowed, f"{part} imports {sorted(used - allowed)}"


def test_cli_help_does_not_load_torch(tmp_path: Path) -> None:
    """`ngcal --help` and `ngcal serve --help` run without importing torch."""
    code = (
        "import sys\nfrom ngcal.cli.main import main\n"
        "for argv in (['--help'], ['serve', '--help']):\n"
        "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
