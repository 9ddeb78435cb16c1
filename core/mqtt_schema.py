"""The daemon's outbound MQTT payloads as pydantic models: the contract an MES reads.

Topics (``<prefix>/<device>/...``; QoS 1 throughout): ``availability`` (retained, the text
``online``/``offline``), ``status`` (retained), ``threshold`` (retained, a
``ThresholdFile``), ``<camera>/verdict``, ``recalibration`` and ``cmd/ack`` (events). The
inbound commands' models are ``ngcal.daemon.commands`` (``ConfirmCmd``, ``RecalibrateCmd``,
``RollbackCmd``). ``ngcal schema`` writes the JSON Schemas of all of them to ``schemas/``;
a test keeps the committed files equal to these models and checks real payloads against
them. Torch-free and daemon-free: only pydantic and ``core.thresholds``.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ngcal.core.thresholds import ThresholdFile

#: every ``cmd/ack`` status (the daemon's ``AckStatus``): accepted (a confirmation or a dry
#: run taken), duplicate (request_id seen before), rejected (the command is wrong), applied
#: (a new threshold version), unchanged (nothing worth changing), refused (guard rails)
ACK_STATUSES = ("accepted", "duplicate", "rejected", "applied", "unchanged", "refused")


class _Payload(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class VerdictPayload(_Payload):
    """``<prefix>/<device>/<camera>/verdict``: one decision about one image file version."""

    schema_: Literal["ngcal.verdict/1"] = Field(alias="schema")
    msg_id: str = Field(description="deterministic id of this file version (32 hex)")
    camera: str
    image: str = Field(description="path of the image relative to the camera folder")
    size: int = Field(description="file size in bytes")
    mtime_ns: int
    sha256: str = Field(description="sha256 of the image file; cmd/confirm may name it")
    verdict: Literal["OK", "NG", "ERROR"]
    reason: str | None = Field(description="why ERROR (e.g. unreadable, too_large), else null")
    score: float | None = Field(description="image anomaly score; null for ERROR")
    threshold: float | None = Field(description="score at or above which a part is NG")
    threshold_version: int | None
    model_sha256: str
    detected_at: float = Field(description="seconds since the epoch: the file was complete")
    decided_at: float = Field(description="seconds since the epoch: the decision committed")
    timings_ms: dict[str, float] = Field(default_factory=dict)
    audit: bool = Field(
        default=False, description="drawn at random from OK verdicts for a person to check"
    )


class AckPayload(_Payload):
    """``<prefix>/<device>/cmd/ack`` (and a command's ``response_topic``): one answer."""

    schema_: Literal["ngcal.ack/1"] = Field(alias="schema")
    request_id: str = Field(description="the command's request_id (or mid-<n> when it had none)")
    status: Literal["accepted", "duplicate", "rejected", "applied", "unchanged", "refused"]
    reason: str | None
    original_status: str | None = Field(default=None, description="duplicate: first answer")
    score: float | None = Field(default=None, description="confirm: the image's score")
    source: str | None = Field(default=None, description="confirm: verdict or intake")
    label: Literal["OK", "NG"] | None = None
    threshold: float | None = Field(default=None, description="recalibrate/rollback: now")
    threshold_version: int | None = None


class RecalibrationPayload(_Payload):
    """``<prefix>/<device>/recalibration``: a recalibration or rollback, applied or not; or
    ``manual_override``: the daemon started from a thresholds.json ngcal did not write,
    accepted by ``recalibration.accept_manual_thresholds`` (``old`` is then null)."""

    schema_: Literal["ngcal.recalibration/1"] = Field(alias="schema")
    action: Literal["recalibrate", "rollback", "manual_override"]
    applied: bool
    reason: str = Field(description="the guard rails' or the evidence's reason, in words")
    old: ThresholdFile | None
    proposed: ThresholdFile | None
    new: ThresholdFile | None = Field(description="the new current threshold when applied")
    audit: dict[str, Any]


class StatusThreshold(_Payload):
    value: float
    version: int


class StatusPayload(_Payload):
    """``<prefix>/<device>/status`` (retained, every ``status_interval_s``)."""

    schema_: Literal["ngcal.status/1"] = Field(alias="schema")
    device: str
    time: float
    uptime_s: float
    model_sha256: str
    engine: str
    threshold: StatusThreshold
    outbox: dict[str, Any] = Field(description="backlog, refused, oldest_age_s")
    queue_depth: int
    verdicts_since_start: int
    last_verdict_at: float | None
    dropped_events: int
    alarms: list[dict[str, Any]]
    heartbeats_s: dict[str, float]


#: schema file stem -> (topic under <prefix>/<device>/, model)
OUTBOUND: dict[str, tuple[str, type[BaseModel]]] = {
    "verdict": ("<camera>/verdict", VerdictPayload),
    "ack": ("cmd/ack", AckPayload),
    "recalibration": ("recalibration", RecalibrationPayload),
    "status": ("status", StatusPayload),
    "threshold": ("threshold", ThresholdFile),
}
