"""scripts/install-edge.sh --dry-run and README's promises (CI runs both for real)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_dry_run_prints_every_step_and_changes_nothing(tmp_path: Path) -> None:
    """The dry run lists the venv with system site-packages, the torch-free install, the
    unit, the config check and the service check, in order; it creates nothing."""
    prefix = tmp_path / "opt"
    res = subprocess.run(
        [
            "bash",
            str(REPO / "scripts/install-edge.sh"),
            "--dry-run",
            "--prefix",
            str(prefix),
            "--bundle",
            str(tmp_path / "bundle"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 0, res.stderr
    steps = [line for line in res.stdout.splitlines() if re.match(r"\[\d+\] ", line)]
    text = "\n".join(steps)
    order = [
        "-m venv --system-site-packages",
        "pip install --no-deps",
        "ngcal.service /etc/systemd/system/",
        "--check-config",
        "systemctl enable --now ngcal",
        "systemctl --no-pager status ngcal",
    ]
    positions = [text.find(s) for s in order]
    assert all(p >= 0 for p in positions) and positions == sorted(positions), text
    assert "torch" not in text
    assert not prefix.exists()


def test_unknown_option_is_refused() -> None:
    res = subprocess.run(
        ["bash", str(REPO / "scripts/install-edge.sh"), "--dry-rn"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert res.returncode == 2 and "unknown option --dry-rn" in res.stderr


def test_readme_install_brings_what_its_test_command_needs() -> None:
    """README's first command installs the test extra and runs the demo; its second is the
    command .ci/run runs verbatim."""
    readme = (REPO / "README.md").read_text()
    first = readme.split("```bash", 1)[1].split("```", 1)[0]
    assert "ngcal demo" in first and 'pytest -m "not slow"' in first
    ci = (REPO / ".ci/run").read_text()
    assert 'pytest -m "not slow"' in ci

    def extras(text: str) -> set[str]:
        spec = re.search(r'-e "\.\[([a-z,]+)\]"', text)
        assert spec is not None, "no editable install with extras"
        return set(spec.group(1).split(","))

    # every extra CI installs for the tests (all but the lint/type tools) is in README's
    assert extras(ci) - {"dev"} <= extras(first), (extras(ci), extras(first))


def test_readme_links_only_to_files_in_the_repo() -> None:
    """Every relative link and every backticked repo path in README exists; none leaves it."""
    readme = (REPO / "README.md").read_text()
    assert "../shared/design" not in readme
    for target in re.findall(r"\]\(([^)#]+)\)", readme):
        if target.startswith(("http://", "https://")):
            continue
        assert not target.startswith(".."), target
        assert (REPO / target).exists(), target
