"""Config: pydantic validation with file, line and key for every error; secrets at use."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ngcal.core.errors import ConfigError
from ngcal.daemon.config import ConfigInvalid, MqttConfig, load_config, parse_config

REPO = Path(__file__).resolve().parents[2]

GOOD = """device_id: box1
bundle: bundle
state_dir: state
cameras:
  - id: top
    watch: cams/top
"""


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    """``ngcal serve --config PATH --check-config`` as a subprocess."""
    return subprocess.run(
        [sys.executable, "-m", "ngcal.cli.main", "serve", "--config", str(path), "--check-config"],
        capture_output=True,
        text=True,
    )


def test_example_config_is_valid():
    """The shipped example parses, with every section present."""
    cfg = load_config(REPO / "configs" / "daemon.example.yaml")
    assert [c.id for c in cfg.cameras] == ["top", "side"]
    assert cfg.mqtt.password_credential == "mqtt-password"
    assert cfg.recalibration.mode == "cost"


def test_relative_paths_resolve_against_the_config_file(tmp_path):
    """bundle, state_dir, watch folders and TLS files are relative to the YAML file's folder."""
    p = tmp_path / "d.yaml"
    p.write_text(GOOD)
    cfg = load_config(p)
    assert cfg.bundle == tmp_path / "bundle"
    assert cfg.cameras[0].watch == tmp_path / "cams" / "top"
    p.write_text(GOOD + "mqtt:\n  tls:\n    ca_file: tls/ca.pem\n    cert_file: /etc/c.pem\n")
    tls = load_config(p).mqtt.tls
    assert tls is not None and tls.ca_file == tmp_path / "tls" / "ca.pem"
    assert tls.cert_file == Path("/etc/c.pem") and tls.key_file is None


def test_every_error_names_file_line_and_key():
    """Unknown keys (typos), bad values, and missing keys each give file:line: key."""
    text = """device_id: box 1
bundle: b
state_dir: s
cameras:
  - id: top
    watch: w
    glb: "*.png"
mqtt:
  port: 70000
  keepalive: 30
runtime:
  backend: cuda
"""
    with pytest.raises(ConfigInvalid) as ei:
        parse_config(text, source="d.yaml")
    found = {(i.key, i.line) for i in ei.value.issues}
    assert ("device_id", 1) in found
    assert ("cameras.0.glb", 7) in found
    assert ("mqtt.port", 9) in found
    assert ("runtime.backend", 12) in found
    assert all(str(i).startswith(f"d.yaml:{i.line}: {i.key}: ") for i in ei.value.issues)
    assert any("unknown key" in i.message for i in ei.value.issues)


def test_missing_key_points_at_its_parent_and_yaml_syntax_errors_have_lines():
    """A missing required key is reported at the mapping that lacks it; broken YAML too."""
    with pytest.raises(ConfigInvalid) as ei:
        parse_config("device_id: a\nbundle: b\ncameras:\n  - id: c\n", source="x.yaml")
    keys = {(i.key, i.line) for i in ei.value.issues}
    assert ("state_dir", 1) in keys and ("cameras.0.watch", 4) in keys
    with pytest.raises(ConfigInvalid) as ei:
        parse_config("device_id: a\ncameras: [\n", source="x.yaml")
    assert ei.value.issues[0].line >= 2


def test_check_config_cli_prints_errors_and_exits_nonzero(tmp_path, tiny_bundle):
    """`ngcal serve --check-config` prints file:line: key per error and exits 2; it also
    opens the bundle (hash check); 0 when everything is valid."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD + "mqtt:\n  hots: x\n")
    r = check_config(bad)
    assert r.returncode == 2
    assert f"{bad}:8: mqtt.hots: unknown key" in r.stderr
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    (tmp_path / "bundle").mkdir()
    r = check_config(good)
    assert r.returncode == 2 and "bundle:" in r.stderr  # an empty folder is not a bundle
    good.write_text(GOOD.replace("bundle: bundle", f"bundle: {tiny_bundle}"))
    (tmp_path / "cams" / "top").mkdir(parents=True)
    r = check_config(good)
    assert r.returncode == 0, r.stderr


def test_password_is_read_at_use_from_env_or_credential(tmp_path, monkeypatch):
    """password_env and password_credential are read when called, not at parse time."""
    m = MqttConfig(username="u", password_env="NGCAL_PW_TEST")
    monkeypatch.delenv("NGCAL_PW_TEST", raising=False)
    with pytest.raises(ConfigError, match="NGCAL_PW_TEST"):
        m.password()
    monkeypatch.setenv("NGCAL_PW_TEST", "s3cret")
    assert m.password() == "s3cret"
    (tmp_path / "mqtt-pw").write_text("from-cred\n")
    m2 = MqttConfig(username="u", password_credential="mqtt-pw")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)
    with pytest.raises(ConfigError, match="CREDENTIALS_DIRECTORY"):
        m2.password()
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    assert m2.password() == "from-cred"
    with pytest.raises(ValueError, match="not both"):
        MqttConfig(password_env="A", password_credential="b")


def test_check_config_warns_when_tls_or_authentication_is_off_for_a_remote_broker(tmp_path):
    """`serve --check-config` warns, naming host:port, when a non-loopback broker is used
    without TLS or without a user name; a loopback broker or a secured one gives no
    warning."""
    from ngcal.daemon.link import security_warnings

    plain = MqttConfig(host="broker.plant.local", port=1883)
    warned = security_warnings(plain)
    assert len(warned) == 2 and all("broker.plant.local:1883" in w for w in warned)
    assert "mqtt.tls is off" in warned[0] and "authentication is off" in warned[1]
    secure = MqttConfig(
        host="10.0.0.5", port=8883, username="box1", tls={"ca_file": tmp_path / "ca.pem"}
    )
    assert security_warnings(secure) == []
    assert security_warnings(MqttConfig(host="127.0.0.1")) == []
    assert security_warnings(MqttConfig(host="::1")) == []
    cfg = tmp_path / "remote.yaml"
    cfg.write_text(GOOD + "mqtt:\n  host: broker.plant.local\n")
    r = check_config(cfg)
    assert f"{cfg}: warning: mqtt.tls is off for the non-loopback broker" in r.stderr
    assert "warning: mqtt authentication is off" in r.stderr
