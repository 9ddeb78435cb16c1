"""The systemd unit: `systemd-analyze verify` with empty stderr, and the hardening we rely on."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

UNIT = Path(__file__).resolve().parents[2] / "systemd" / "ngcal.service"


def test_unit_keeps_hardening_and_gpu_access():
    """Type=notify with a watchdog, strict hardening, and GPU device nodes allowed."""
    text = UNIT.read_text()
    for line in (
        "Type=notify",
        "WatchdogSec=",
        "ProtectSystem=strict",
        "NoNewPrivileges=yes",
        "ReadWritePaths=/var/lib/ngcal",
        "DevicePolicy=closed",
        "DeviceAllow=/dev/nvidiactl rw",
        "DeviceAllow=char-nvidia-frontend rw",
        "DeviceAllow=/dev/nvhost-ctrl-gpu rw",
        "LoadCredentialEncrypted=mqtt-password",
    ):
        assert line in text, line
    assert "PrivateDevices=yes" not in text  # it would hide /dev/nvidia*


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None,
    reason="systemd-analyze not installed (apt-get install systemd)",
)
def test_systemd_analyze_verify_is_clean(tmp_path):
    """`systemd-analyze verify` prints nothing on stderr (ExecStart pointed at this ngcal)."""
    ngcal = shutil.which("ngcal")
    if ngcal is None:
        pytest.skip("the ngcal console script is not on PATH (pip install -e .)")
    unit = tmp_path / "ngcal.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ngcal", ngcal))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True)
    assert r.returncode == 0 and r.stderr == "", r.stderr
