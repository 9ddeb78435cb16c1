"""Values the daemon passes around and the MQTT topics and payloads it speaks.

Topic scheme (``architecture.md``): ``<prefix>/<device>/availability|status|threshold``
(retained), ``<prefix>/<device>/<camera>/verdict``, ``.../recalibration``, ``.../cmd/ack``
(events), and the inbound ``.../cmd/confirm|recalibrate|rollback``. Every JSON payload
has a ``schema`` field.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

VERDICT_SCHEMA = "ngcal.verdict/1"
ACK_SCHEMA = "ngcal.ack/1"
STATUS_SCHEMA = "ngcal.status/1"
RECAL_SCHEMA = "ngcal.recalibration/1"

COMMAND_KINDS = ("confirm", "recalibrate", "rollback")

Label = Literal["OK", "NG", "ERROR"]
#: accepted (a confirmation or a dry run taken), duplicate (request_id seen before),
#: rejected (malformed or invalid: the command itself is wrong), applied (a new threshold
#: version), unchanged (valid, but nothing worth changing), refused (valid, but the guard
#: rails or the evidence do not allow it)
AckStatus = Literal["accepted", "duplicate", "rejected", "applied", "unchanged", "refused"]


def make_msg_id(device: str, camera: str, rel_path: str, sha256: str, mtime_ns: int) -> str:
    """Deterministic verdict id: the same file version always yields the same id (32 hex)."""
    key = "\x1f".join((device, camera, rel_path, sha256, str(mtime_ns)))
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


@dataclass(frozen=True)
class Verdict:
    """One decision about one image file version.

    ``score`` and ``threshold`` are image-score units; timings are seconds since the epoch
    (``detected_at``: the file was found complete; ``decided_at``: the decision committed).
    """

    msg_id: str
    camera: str
    path: str
    size: int
    mtime_ns: int
    sha256: str
    verdict: Label
    reason: str | None
    score: float | None
    threshold: float | None
    threshold_version: int | None
    model_sha256: str
    detected_at: float
    decided_at: float
    timings_ms: dict[str, float] = field(default_factory=dict)
    #: drawn at random (``recalibration.audit_share`` of OK verdicts) for a person to check
    audit: bool = False

    def payload(self) -> bytes:
        """The ``<camera>/verdict`` message body."""
        body: dict[str, Any] = {"schema": VERDICT_SCHEMA, **asdict(self)}
        body["image"] = body.pop("path")
        return json.dumps(body, separators=(",", ":")).encode()


@dataclass(frozen=True)
class Outbound:
    """A message waiting in the outbox: published QoS 1, deleted on a successful PUBACK."""

    topic: str
    payload: bytes
    msg_id: str
    retain: bool = False


@dataclass(frozen=True)
class Topics:
    """Topic names of one device."""

    prefix: str
    device: str

    @property
    def base(self) -> str:
        return f"{self.prefix}/{self.device}"

    @property
    def availability(self) -> str:
        return f"{self.base}/availability"

    @property
    def status(self) -> str:
        return f"{self.base}/status"

    @property
    def threshold(self) -> str:
        return f"{self.base}/threshold"

    @property
    def recalibration(self) -> str:
        return f"{self.base}/recalibration"

    @property
    def ack(self) -> str:
        return f"{self.base}/cmd/ack"

    @property
    def commands(self) -> tuple[str, ...]:
        """The inbound command topics (explicit: ``cmd/+`` would also match ``cmd/ack``)."""
        return tuple(f"{self.base}/cmd/{k}" for k in COMMAND_KINDS)

    def verdict(self, camera: str) -> str:
        return f"{self.base}/{camera}/verdict"

    def command_kind(self, topic: str) -> str | None:
        """``confirm``/``recalibrate``/``rollback`` for an inbound command topic, else None."""
        head = f"{self.base}/cmd/"
        if not topic.startswith(head):
            return None
        kind = topic[len(head) :]
        return kind if kind in COMMAND_KINDS else None


def ack_message(
    topics: Topics, request_id: str, status: AckStatus, reason: str | None, **extra: Any
) -> Outbound:
    """The ``cmd/ack`` answer to one command; its msg_id is derived from request and status."""
    body = {"schema": ACK_SCHEMA, "request_id": request_id, "status": status, "reason": reason}
    body.update(extra)
    mid = hashlib.sha256(f"ack\x1f{request_id}\x1f{status}".encode()).hexdigest()[:32]
    return Outbound(topics.ack, json.dumps(body, separators=(",", ":")).encode(), mid)
