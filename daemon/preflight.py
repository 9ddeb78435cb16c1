"""What ``ngcal serve`` would fail on, found before it starts: every problem at once.

``environment_problems`` checks what the daemon needs from the machine around it: the MQTT
password (environment variable, or ``$CREDENTIALS_DIRECTORY`` and the credential file),
the camera folders (a missing folder is refused unless the camera says ``create: true``,
so a mistyped ``watch`` path is never created and watched silently), the TLS CA,
certificate and key files (they must exist and parse), the confirmation intake folder and
the state folder (it must be writable). ``bundle_problems`` opens the bundle (every hash,
the thresholds file's provenance) and the scorer on the configured backend (one probe
inference, so a manifest that disagrees with the ONNX graph is caught here). The daemon
runs the environment checks at start; ``ngcal serve --check-config`` runs both. Each
problem is one line naming the config key and the offending file or value.
"""

from __future__ import annotations

import os
import ssl
import tempfile
from pathlib import Path

from ngcal.core.errors import NgcalError

from .config import DaemonConfig, MqttConfig


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def credential_problems(mqtt: MqttConfig) -> list[str]:
    """The MQTT password cannot be read where the config says it lives."""
    try:
        mqtt.password()
    except NgcalError as e:
        return [str(e)]
    return []


def camera_problems(cfg: DaemonConfig) -> list[str]:
    """Camera folders that are missing (without ``create: true``), not folders or unreadable."""
    out: list[str] = []
    for i, cam in enumerate(cfg.cameras):
        key = f"cameras.{i}.watch ({cam.id})"
        if cam.watch.is_dir():
            if not os.access(cam.watch, os.R_OK | os.X_OK):
                out.append(f"{key}: {cam.watch} is not readable by this user")
        elif cam.watch.exists():
            out.append(f"{key}: {cam.watch} is not a folder")
        elif not cam.create:
            out.append(
                f"{key}: folder {cam.watch} does not exist (a typo? create it, or set "
                "`create: true` on the camera to have the daemon create it)"
            )
    return out


def tls_problems(mqtt: MqttConfig) -> list[str]:
    """TLS files that are missing or do not parse as a CA bundle / certificate and key."""
    tls = mqtt.tls
    if tls is None:
        return []
    out: list[str] = []
    for name in ("ca_file", "cert_file", "key_file"):
        p = getattr(tls, name)
        if p is not None and not p.is_file():
            out.append(f"mqtt.tls.{name}: {p} does not exist")
    if out:
        return out
    if tls.ca_file is not None:
        try:
            ssl.create_default_context(cafile=str(tls.ca_file))
        except (ssl.SSLError, OSError) as e:
            out.append(f"mqtt.tls.ca_file: {tls.ca_file} is not a PEM CA bundle ({e})")
    if (tls.cert_file is None) != (tls.key_file is None):
        out.append("mqtt.tls: cert_file and key_file go together (mutual TLS needs both)")
    elif tls.cert_file is not None and tls.key_file is not None:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        try:
            ctx.load_cert_chain(str(tls.cert_file), str(tls.key_file))
        except (ssl.SSLError, OSError) as e:
            out.append(
                f"mqtt.tls: {tls.cert_file} and {tls.key_file} are not a matching PEM "
                f"certificate and key ({e})"
            )
    return out


def _nearest_existing(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def state_dir_problems(cfg: DaemonConfig) -> list[str]:
    """The state folder is not writable (or cannot be created). Leaves nothing behind."""
    d = cfg.state_dir
    if d.exists() and not d.is_dir():
        return [f"state_dir: {d} is not a folder"]
    if not d.exists():
        base = _nearest_existing(d.parent)
        if not (base.is_dir() and os.access(base, os.W_OK | os.X_OK)):
            return [f"state_dir: {d} does not exist and {base} is not writable to create it"]
        return []
    try:
        with tempfile.TemporaryFile(dir=d):
            pass
    except OSError as e:
        return [f"state_dir: {d} is not writable ({e.strerror})"]
    return []


def intake_problems(cfg: DaemonConfig) -> list[str]:
    """The confirmation intake folder is configured but missing."""
    d = cfg.recalibration.intake_dir
    if d is not None and not d.is_dir():
        return [f"recalibration.intake_dir: folder {d} does not exist"]
    return []


def environment_problems(cfg: DaemonConfig) -> list[str]:
    """Everything but the bundle: credentials, cameras, TLS files, intake and state folders."""
    return [
        *credential_problems(cfg.mqtt),
        *camera_problems(cfg),
        *tls_problems(cfg.mqtt),
        *intake_problems(cfg),
        *state_dir_problems(cfg),
    ]


def bundle_problems(cfg: DaemonConfig) -> list[str]:
    """Bundle faults: it does not open and verify, or its thresholds are refused or absent.

    Also opens the scorer on the configured backend (one probe inference), so a model the
    runtime cannot load is named here rather than at start.
    """
    from ngcal.core.bundle import open_bundle
    from ngcal.core.runtime import open_scorer

    from .recalibration import MANUAL_FLAG

    try:
        bundle = open_bundle(cfg.bundle)
    except NgcalError as e:
        try:  # the override accepts only what the thresholds' digest check refused
            bundle = open_bundle(cfg.bundle, allow_unsigned_thresholds=True)
        except NgcalError as e2:
            return [f"bundle: {_first_line(e2)}"]
        if not cfg.recalibration.accept_manual_thresholds:
            return [f"bundle: {_first_line(e)} (set {MANUAL_FLAG}: true to accept it)"]
    out: list[str] = []
    if bundle.thresholds is None and not _state_holds_threshold(cfg, bundle.model_sha256):
        out.append(
            f"bundle: {cfg.bundle} has no thresholds.json and {cfg.state_dir} holds no "
            f"threshold for model {bundle.model_sha256[:12]}...; run `ngcal calibrate` and "
            "`ngcal export --thresholds`"
        )
    try:
        scorer = open_scorer(
            bundle,
            backend=cfg.runtime.backend,
            threads=1,
            cache_dir=cfg.runtime.cache_dir,
            max_batch=1,
        )
    except NgcalError as e:
        out.append(f"runtime.backend {cfg.runtime.backend}: {_first_line(e)}")
    else:
        scorer.close()
    return out


def _state_holds_threshold(cfg: DaemonConfig, model_sha256: str) -> bool:
    """True when the state folder's policy state (the daemon's exported copy) is this model's."""
    from ngcal.calibration.policy import PolicyState
    from ngcal.core.files import read_json

    path = cfg.state_dir / "policy_state.json"
    if not path.is_file():
        return False
    try:
        current = PolicyState.from_json(read_json(path)).current
    except NgcalError:
        return False
    return current.model_sha256 in ("", model_sha256)


def all_problems(cfg: DaemonConfig) -> list[str]:
    """Every problem ``serve`` would fail on (``--check-config``)."""
    return [*environment_problems(cfg), *bundle_problems(cfg)]
