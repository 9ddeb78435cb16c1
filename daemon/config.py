"""The daemon's YAML config: pydantic v2 models and errors that name file, line and key.

``load_config(path)`` parses YAML, validates it against ``DaemonConfig`` (every model
forbids unknown keys, so a typo is an error, not a silent default) and maps each
pydantic error location back to the YAML node that caused it via yaml's node marks.
Secrets never live in the file: the MQTT password comes from an environment variable or a
systemd credential (``$CREDENTIALS_DIRECTORY/<name>``) and is read when connecting.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ngcal.core.errors import ConfigError
from ngcal.core.thresholds import DEFAULT_COST_RATIO, DEFAULT_PREVALENCE


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CameraConfig(_Section):
    """One camera: the folder it writes finished images into."""

    id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="camera id, used in topics")
    watch: Path = Field(description="folder the camera writes images into")
    glob: str | None = Field(
        default=None, description="file name pattern, e.g. '*.png' (default: any image suffix)"
    )
    recursive: bool = Field(default=False, description="also watch sub-folders")
    create: bool = Field(
        default=False,
        description="create the folder when missing (default: a missing folder is refused, "
        "so a mistyped path is never watched silently)",
    )


class RuntimeConfig(_Section):
    """Which scoring runtime runs the bundle's model."""

    backend: Literal["ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt"] = Field(
        default="ort-cpu", description="onnxruntime CPU/CUDA/TensorRT EP, or a TensorRT engine"
    )
    threads: int = Field(default=1, ge=1, le=64, description="intra-op threads (CPU backends)")
    batch_size: int = Field(
        default=4, ge=1, le=256, description="largest batch; smaller when the queue is short"
    )
    cache_dir: Path | None = Field(default=None, description="engine cache (TensorRT)")


class IntakeConfig(_Section):
    """How files are taken from the watch folders."""

    queue_size: int = Field(default=256, ge=1, description="bounded intake queue (back-pressure)")
    settle_seconds: float = Field(
        default=1.0,
        ge=0,
        description="size-stable time before a file seen only by polling is taken",
    )
    rescan_seconds: float = Field(
        default=30.0, gt=0, description="period of the reconciliation scan of every folder"
    )
    polling: bool = Field(
        default=False, description="use watchdog's polling observer (no inotify, e.g. NFS)"
    )
    max_pixels: int = Field(
        default=50_000_000, ge=1, description="refuse larger images before decoding them"
    )


class TlsConfig(_Section):
    """TLS files for the broker connection."""

    ca_file: Path | None = Field(default=None, description="CA bundle to verify the broker")
    cert_file: Path | None = Field(default=None, description="client certificate (mutual TLS)")
    key_file: Path | None = Field(default=None, description="client key (mutual TLS)")


class MqttConfig(_Section):
    """The broker connection; the password is never stored here."""

    host: str = Field(default="localhost", description="broker host name or address")
    port: int = Field(default=1883, ge=1, le=65535, description="broker TCP port")
    client_id: str | None = Field(
        default=None, description="MQTT client id (default ngcal-<device_id>); must be stable"
    )
    username: str | None = Field(default=None, description="MQTT user name")
    password_env: str | None = Field(
        default=None, description="environment variable holding the password"
    )
    password_credential: str | None = Field(
        default=None, description="systemd credential name ($CREDENTIALS_DIRECTORY/<name>)"
    )
    tls: TlsConfig | None = Field(default=None, description="TLS settings; absent: plain TCP")
    topic_prefix: str = Field(default="ngcal", pattern=r"^[^#+]+$", description="topic prefix")
    keepalive: int = Field(default=30, ge=5, le=3600, description="keepalive in seconds")
    session_expiry_s: int = Field(
        default=7 * 24 * 3600, ge=0, description="persistent session lifetime after disconnect"
    )
    max_inflight: int = Field(default=64, ge=1, le=1000, description="unacked QoS 1 publishes")
    max_command_bytes: int = Field(default=65536, ge=256, description="larger commands rejected")

    @model_validator(mode="after")
    def _one_password_source(self) -> MqttConfig:
        if self.password_env and self.password_credential:
            raise ValueError("set password_env or password_credential, not both")
        return self

    def password(self) -> str | None:
        """Read the password now (env var or systemd credential); None when none is set."""
        if self.password_env:
            value = os.environ.get(self.password_env)
            if value is None:
                raise ConfigError(
                    f"mqtt.password_env: environment variable {self.password_env} unset"
                )
            return value
        if self.password_credential:
            cred_dir = os.environ.get("CREDENTIALS_DIRECTORY")
            if not cred_dir:
                raise ConfigError(
                    "mqtt.password_credential: $CREDENTIALS_DIRECTORY is unset "
                    "(LoadCredential= in the unit provides it)"
                )
            path = Path(cred_dir) / self.password_credential
            try:
                return path.read_text(encoding="utf-8").rstrip("\r\n")
            except OSError as e:
                raise ConfigError(f"mqtt.password_credential: cannot read {path}: {e}") from e
        return None


class RecalibrationConfig(_Section):
    """Guard rails of on-device recalibration (see ``ngcal.calibration.policy``)."""

    min_real_ng: int = Field(default=3, ge=0, description="confirmed NG needed before a change")
    min_real_ok: int = Field(
        default=0,
        ge=0,
        description="real OK parts needed before a change (confirmed OKs, plus the unlabelled "
        "verdicts when stream_window > 0)",
    )
    max_step: float = Field(
        default=0.10, ge=0, description="largest change per step, as a fraction of |threshold|"
    )
    hysteresis: float = Field(
        default=0.01, ge=0, description="moves below this fraction of |threshold| are not applied"
    )
    dry_run: bool = Field(default=False, description="decide and log, never apply")
    gain_level: float = Field(
        default=0.9,
        ge=0,
        lt=1,
        description="mode cost: move only when the expected cost gain is above 0 at this "
        "confidence (bootstrap lower bound); 0: off",
    )
    mode: Literal["target_fpr", "f1", "cost", "miss_rate"] = Field(
        default="cost", description="what the threshold optimises"
    )
    target_fpr: float = Field(default=0.01, gt=0, lt=1, description="for mode target_fpr")
    miss_rate: float = Field(default=0.05, gt=0, lt=1, description="for mode miss_rate")
    confidence: float = Field(default=0.95, gt=0, lt=1, description="confidence of rate bounds")
    prevalence: float = Field(
        default=DEFAULT_PREVALENCE, gt=0, lt=1, description="defect rate (mode cost)"
    )
    cost_ratio: float = Field(
        default=DEFAULT_COST_RATIO, gt=0, description="miss cost / false reject cost"
    )
    auto_on_confirm: bool = Field(
        default=False, description="run the policy after every confirmation"
    )
    intake_dir: Path | None = Field(
        default=None, description="folder for confirmed images the daemon never saw"
    )
    audit_share: float = Field(
        default=0.0,
        ge=0,
        le=1,
        description="share of OK verdicts drawn at random and marked audit: true for a person "
        "to check (0: off); their confirmations estimate the escape rate without bias",
    )
    stream_window: int = Field(
        default=5000,
        ge=0,
        description="recent scored verdicts taken, with the confirmed OKs, as the line's good "
        "parts (unconfirmed defects among them: about `prevalence` at most); 0: off, the "
        "confirmed OKs alone",
    )
    accept_manual_thresholds: bool = Field(
        default=False,
        description="accept a thresholds.json ngcal did not write (operator override: "
        "audited and published)",
    )


class ServiceConfig(_Section):
    """Service timings."""

    status_interval_s: float = Field(default=30.0, gt=0, description="retained status period")
    heartbeat_timeout_s: float = Field(
        default=60.0, gt=0, description="stop WATCHDOG pings when a worker is silent this long"
    )
    drain_timeout_s: float = Field(default=10.0, ge=0, description="time to drain on stop")


class DaemonConfig(_Section):
    """``ngcal serve`` configuration file."""

    device_id: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$", description="device id in topics")
    bundle: Path = Field(description="exported bundle folder (manifest.json, model.onnx)")
    state_dir: Path = Field(description="writable folder: state.db, thresholds, policy state")
    cameras: list[CameraConfig] = Field(min_length=1, description="watched cameras")
    runtime: RuntimeConfig = Field(default_factory=RuntimeConfig)
    intake: IntakeConfig = Field(default_factory=IntakeConfig)
    mqtt: MqttConfig = Field(default_factory=MqttConfig)
    recalibration: RecalibrationConfig = Field(default_factory=RecalibrationConfig)
    service: ServiceConfig = Field(default_factory=ServiceConfig)

    @field_validator("cameras")
    @classmethod
    def _unique_ids(cls, cams: list[CameraConfig]) -> list[CameraConfig]:
        seen: set[str] = set()
        for c in cams:
            if c.id in seen:
                raise ValueError(f"camera id {c.id!r} appears twice")
            seen.add(c.id)
        return cams


@dataclass(frozen=True)
class ConfigIssue:
    """One validation error: file, 1-based line, dotted key and message."""

    file: str
    line: int
    key: str
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.key}: {self.message}"


class ConfigInvalid(ConfigError):
    """A config file failed validation; ``issues`` lists every error."""

    def __init__(self, issues: list[ConfigIssue]) -> None:
        self.issues = issues
        super().__init__("\n".join(str(i) for i in issues))


def _node_for(root: Any, loc: tuple[Any, ...]) -> tuple[Any, bool]:
    """Deepest YAML node along ``loc``; second item is True when the whole path resolved."""
    import yaml

    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = None
            for k, v in node.value:
                if isinstance(k, yaml.ScalarNode) and k.value == str(part):
                    nxt = (k, v)
                    break
            if nxt is None:
                return node, False
            node = nxt[1]
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return node, False
            node = node.value[part]
        else:
            return node, False
    return node, True


def _key_line(root: Any, loc: tuple[Any, ...]) -> int:
    """1-based line of the key named by ``loc`` (or of its nearest existing parent)."""
    import yaml

    if not loc:
        return (root.start_mark.line + 1) if root is not None else 1
    parent, ok = _node_for(root, loc[:-1])
    if ok and isinstance(parent, yaml.MappingNode):
        for k, _v in parent.value:
            if isinstance(k, yaml.ScalarNode) and k.value == str(loc[-1]):
                return int(k.start_mark.line) + 1
    if (
        ok
        and isinstance(parent, yaml.SequenceNode)
        and isinstance(loc[-1], int)
        and loc[-1] < len(parent.value)
    ):
        return int(parent.value[loc[-1]].start_mark.line) + 1
    return int(parent.start_mark.line) + 1


def parse_config(text: str, *, source: str = "<config>") -> DaemonConfig:
    """Validate YAML ``text``; ConfigInvalid lists ``file:line: key: message`` per error."""
    import yaml

    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        raise ConfigInvalid([ConfigIssue(source, line, "<yaml>", str(e).replace("\n", " "))]) from e
    if not isinstance(data, dict):
        raise ConfigInvalid([ConfigIssue(source, 1, "<root>", "expected a mapping of settings")])
    try:
        return DaemonConfig.model_validate(data)
    except ValidationError as e:
        issues = []
        for err in e.errors():
            loc = tuple(
                x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-"))
            )
            key = ".".join(str(x) for x in loc) or "<root>"
            msg = err["msg"]
            if err["type"] == "extra_forbidden":
                msg = "unknown key (typo?)"
            issues.append(ConfigIssue(source, _key_line(root, loc), key, msg))
        raise ConfigInvalid(issues) from e


def load_config(path: str | os.PathLike[str]) -> DaemonConfig:
    """Read and validate a YAML config file; relative paths resolve against the file's folder."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"{p}: cannot read config ({e.strerror})") from e
    cfg = parse_config(text, source=str(p))
    return _resolve_paths(cfg, p.resolve().parent)


def _resolve_paths(cfg: DaemonConfig, base: Path) -> DaemonConfig:
    def r(x: Path | None) -> Path | None:
        return None if x is None else (x if x.is_absolute() else base / x)

    cams = [c.model_copy(update={"watch": r(c.watch)}) for c in cfg.cameras]
    recal = cfg.recalibration.model_copy(update={"intake_dir": r(cfg.recalibration.intake_dir)})
    runtime = cfg.runtime.model_copy(update={"cache_dir": r(cfg.runtime.cache_dir)})
    mqtt = cfg.mqtt
    if mqtt.tls is not None:
        t = mqtt.tls
        tls = t.model_copy(
            update={"ca_file": r(t.ca_file), "cert_file": r(t.cert_file), "key_file": r(t.key_file)}
        )
        mqtt = mqtt.model_copy(update={"tls": tls})
    return cfg.model_copy(
        update={
            "bundle": r(cfg.bundle),
            "state_dir": r(cfg.state_dir),
            "cameras": cams,
            "recalibration": recal,
            "runtime": runtime,
            "mqtt": mqtt,
        }
    )
