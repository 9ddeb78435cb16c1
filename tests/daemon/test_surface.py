"""The daemon's operator surface: `serve --check-config` reports every problem at once, a
missing camera folder is refused (never created and watched silently), and the start-up
summary line names bundle, model, threshold, cameras, broker and TLS."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from daemon_kit import daemon_config

from ngcal.core.errors import ConfigError
from ngcal.daemon.config import load_config
from ngcal.daemon.preflight import all_problems, environment_problems
from ngcal.daemon.service import Daemon


def check_config(path: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "ngcal.cli.main", "serve", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
        env=env,
    )


def test_check_config_reports_every_problem_at_once(tmp_path, tiny_bundle, monkeypatch):
    """A config with five problems (unset password variable, missing camera folder, missing
    CA file, garbage client certificate, a folder that is not a bundle) gets all five named,
    one line each, and exit code 2; fixing them gives OK."""
    (tmp_path / "notabundle").mkdir()
    (tmp_path / "cert.pem").write_text("not a certificate\n")
    (tmp_path / "key.pem").write_text("not a key\n")
    cfg = tmp_path / "d.yaml"
    cfg.write_text(
        """device_id: box1
bundle: notabundle
state_dir: state
cameras:
  - id: top
    watch: cams/tpo
mqtt:
  username: u
  password_env: NGCAL_SURFACE_TEST_PW
  tls:
    ca_file: ca.pem
    cert_file: cert.pem
    key_file: key.pem
"""
    )
    monkeypatch.delenv("NGCAL_SURFACE_TEST_PW", raising=False)
    r = check_config(cfg)
    assert r.returncode == 2
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith(f"{cfg}: ")]
    text = "\n".join(lines)
    assert "NGCAL_SURFACE_TEST_PW unset" in text
    assert "cameras.0.watch (top)" in text and "cams/tpo does not exist" in text
    assert "mqtt.tls.ca_file" in text and f"{tmp_path / 'ca.pem'} does not exist" in text
    assert "bundle:" in text
    assert f"{cfg}: 4 problem(s)" in r.stderr  # the CA check stops before parsing cert/key
    assert not (tmp_path / "cams" / "tpo").exists()  # checking never creates the folder
    # the CA exists but the client certificate and key are garbage: named too
    (tmp_path / "ca.pem").write_text("garbage\n")
    r = check_config(cfg)
    assert "mqtt.tls.ca_file" in r.stderr and "not a PEM CA bundle" in r.stderr
    assert "are not a matching PEM certificate and key" in r.stderr
    # everything fixed: OK
    cfg.write_text(
        f"""device_id: box1
bundle: {tiny_bundle}
state_dir: state
cameras:
  - id: top
    watch: cams/top
    create: true
"""
    )
    r = check_config(cfg)
    assert r.returncode == 0, r.stderr
    assert "OK (1 camera(s), device box1)" in r.stdout


def test_credentials_directory_and_file_are_checked(tmp_path, monkeypatch):
    """password_credential needs $CREDENTIALS_DIRECTORY and a readable file in it."""
    (tmp_path / "cam").mkdir()
    p = tmp_path / "d.yaml"
    p.write_text(
        "device_id: b\nbundle: b\nstate_dir: s\ncameras:\n  - id: c\n    watch: cam\n"
        "mqtt:\n  password_credential: mqtt-pw\n"
    )
    cfg = load_config(p)
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    assert any("CREDENTIALS_DIRECTORY is unset" in x for x in environment_problems(cfg))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path / "creds"))
    assert any("cannot read" in x and "mqtt-pw" in x for x in environment_problems(cfg))
    (tmp_path / "creds").mkdir()
    (tmp_path / "creds" / "mqtt-pw").write_text("pw\n")
    assert environment_problems(cfg) == []


def test_state_dir_must_be_writable(tmp_path):
    """The state folder is checked without residue; a file where the folder should be is named."""
    (tmp_path / "cam").mkdir()
    state = tmp_path / "state"
    state.mkdir()
    p = tmp_path / "d.yaml"
    p.write_text("device_id: b\nbundle: b\nstate_dir: state\ncameras:\n  - id: c\n    watch: cam\n")
    cfg = load_config(p)
    assert environment_problems(cfg) == []
    assert list(state.iterdir()) == []
    (tmp_path / "file").write_text("x")
    cfg2 = cfg.model_copy(update={"state_dir": tmp_path / "file"})
    assert environment_problems(cfg2) == [f"state_dir: {tmp_path / 'file'} is not a folder"]


def test_a_missing_camera_folder_is_refused_at_start_unless_create(tmp_path, tiny_bundle):
    """`serve` refuses a config whose camera folder does not exist, naming the key and the
    folder, and does not create it; `create: true` lets the daemon create it."""
    p = tmp_path / "d.yaml"
    p.write_text(
        f"device_id: b\nbundle: {tiny_bundle}\nstate_dir: state\n"
        "cameras:\n  - id: top\n    watch: cams/tpo\n"
    )
    cfg = load_config(p)
    with pytest.raises(ConfigError, match=r"cameras\.0\.watch \(top\): folder .*tpo does not"):
        Daemon(cfg).start()
    assert not (tmp_path / "cams").exists()
    assert not (tmp_path / "state").exists()  # refused before anything was written
    created = cfg.model_copy(
        update={"cameras": [cfg.cameras[0].model_copy(update={"create": True})]}
    )
    assert all_problems(created) == []


@pytest.mark.mqtt
def test_startup_summary_line_is_logged_at_info(tmp_path, broker, daemon_process, tiny_bundle):
    """One INFO line at start names the bundle, model, engine, threshold (value, version,
    mode), every camera with its folder, the broker's host:port and TLS off."""
    cfg = daemon_config(tmp_path, tiny_bundle, broker.port, cameras=("cam1", "cam2"))
    d = daemon_process(cfg)
    d.start()
    deadline = time.monotonic() + 10
    while "ngcal serve dev1:" not in d.log():
        assert time.monotonic() < deadline, d.log()
        time.sleep(0.1)
    line = next(ln for ln in d.log().splitlines() if "ngcal serve dev1:" in ln)
    assert " INFO " in line
    assert f"bundle {tiny_bundle}" in line
    assert "(model abababababab, onnxruntime:CPUExecutionProvider)" in line
    assert "threshold v1 0.5 (fixed, by ngcal calibrate)" in line
    assert f"cam1={tmp_path / 'watch' / 'cam1'}" in line and "cam2=" in line
    assert f"broker 127.0.0.1:{broker.port} TLS off" in line
    assert "WARNING" not in d.log()  # a clean start needs nobody's attention


def test_a_bundle_without_thresholds_needs_a_stored_one(tmp_path, tiny_bundle):
    """No thresholds.json in the bundle is a problem unless the state folder already holds
    this model's threshold (what `serve` would start from)."""
    import shutil

    from ngcal.core.bundle import open_bundle
    from ngcal.daemon.messages import Topics
    from ngcal.daemon.recalibration import ThresholdKeeper
    from ngcal.daemon.store import Store

    bare = tmp_path / "bare"
    shutil.copytree(tiny_bundle, bare)
    (bare / "thresholds.json").unlink()
    (tmp_path / "cam").mkdir()
    p = tmp_path / "d.yaml"
    p.write_text(
        f"device_id: b\nbundle: {bare}\nstate_dir: state\ncameras:\n  - id: c\n    watch: cam\n"
    )
    cfg = load_config(p)
    problems = all_problems(cfg)
    assert len(problems) == 1 and "has no thresholds.json" in problems[0]
    store = Store(cfg.state_dir)  # a daemon that ran before with the full bundle
    ThresholdKeeper(
        store, cfg.state_dir, open_bundle(tiny_bundle), cfg.recalibration, Topics("n", "b")
    )
    store.close()
    assert all_problems(cfg) == []


def test_a_hand_edited_manifest_is_one_clear_line(tmp_path, tiny_bundle):
    """A manifest whose image_size disagrees with the ONNX graph is one check-config line
    naming both shapes (not an onnxruntime traceback at start)."""
    import json
    import shutil

    from daemon_kit import TINY_SIZE

    edited = tmp_path / "edited"
    shutil.copytree(tiny_bundle, edited)
    m = json.loads((edited / "manifest.json").read_text())
    m["preprocessing"]["image_size"] = TINY_SIZE + 16
    (edited / "manifest.json").write_text(json.dumps(m))
    (tmp_path / "cam").mkdir()
    p = tmp_path / "d.yaml"
    p.write_text(
        f"device_id: b\nbundle: {edited}\nstate_dir: state\ncameras:\n  - id: c\n    watch: cam\n"
    )
    problems = all_problems(load_config(p))
    assert len(problems) == 1 and "\n" not in problems[0]
    assert f"manifest says input [N,3,{TINY_SIZE + 16},{TINY_SIZE + 16}]" in problems[0]
    assert f"3,{TINY_SIZE},{TINY_SIZE}]" in problems[0]
