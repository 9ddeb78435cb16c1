"""``thresholds.json``: a threshold with its method, evidence and expected error rates.

Written by ``ngcal calibrate`` and by the daemon's recalibration; it names the model it
belongs to by sha256 and never lives inside the model graph, so recalibrating never needs
re-exporting. ``ngcal.calibration`` owns the logic; this module owns the file format.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from pathlib import Path
from typing import Final, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import ArtifactError
from .files import atomic_write_json, read_json

THRESHOLDS_SCHEMA: Final = "ngcal.thresholds/1"

#: The default operating point, read by every part that needs one (calibrate, the policy,
#: the daemon's config, the CLI): the share of defective parts on the line, and what a
#: missed defect costs in false rejects.
DEFAULT_PREVALENCE: Final = 0.02
DEFAULT_COST_RATIO: Final = 10.0


class Interval(BaseModel):
    """A point estimate with an interval at ``level``, and what the interval rests on.

    ``kind`` says how far to trust it: ``guarantee`` (a finite-sample bound that holds with
    probability ``level`` for parts exchangeable with the evidence), ``interval`` (a
    confidence interval from a labelled sample of ``n`` items) or ``estimate`` (no stated
    confidence: e.g. the spread of synthetic look-alikes). ``basis`` names the evidence in
    plain words. Files written before these fields existed read as ``kind=None``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: float | None
    low: float | None = None
    high: float | None = None
    level: float = 0.95
    kind: Literal["guarantee", "interval", "estimate"] | None = None
    basis: str | None = None
    n: float | None = None


class ScoreSetRef(BaseModel):
    """One score set a threshold was calibrated on (``ngcal export`` ships it in ``scores/``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    name: str = Field(description="file name under the bundle's scores/ (or the evidence folder)")
    source: str
    severity: float | None = None
    count: int = Field(ge=0)
    sha256: str = Field(description="ScoreSet.content_sha256 (source, severity, items)")


class OperatingPoint(BaseModel):
    """The factory's costs: a miss costs ``cost_ratio`` false rejects at ``prevalence``."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    prevalence: float = Field(default=DEFAULT_PREVALENCE, gt=0, lt=1)
    cost_ratio: float = Field(default=DEFAULT_COST_RATIO, gt=0)


class ThresholdFile(BaseModel):
    """One threshold version."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    schema_: Literal["ngcal.thresholds/1"] = Field(default=THRESHOLDS_SCHEMA, alias="schema")
    value: float = Field(description="image score at or above which a part is NG")
    version: int = Field(default=1, ge=1)
    mode: str = Field(description="target_fpr | f1 | cost | miss_rate | fixed | ...")
    method: str = Field(description="estimator used, e.g. conformal_order_statistic")
    target_fpr: float | None = None
    confidence: float | None = None
    operating_point: OperatingPoint | None = None
    expected_fpr: Interval | None = None
    expected_fnr: Interval | None = None
    evidence: dict[str, int] = Field(default_factory=dict, description="items per source")
    scoresets: tuple[ScoreSetRef, ...] = Field(
        default=(), description="every score set the threshold was calibrated on"
    )
    miss_rate_by_source: dict[str, Interval] = Field(
        default_factory=dict,
        description="miss rate at the threshold per NG evidence kind (synthetic, real_ng)",
    )
    model_sha256: str = ""
    parent_version: int | None = None
    created_at: str = Field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    created_by: str = "ngcal calibrate"
    notes: dict[str, float | int | str | None] = Field(default_factory=dict)


#: key of the content digest inside thresholds.json (not a ThresholdFile field)
DIGEST_KEY: Final = "digest"


def thresholds_digest(body: dict[str, object]) -> str:
    """sha256 of the canonical JSON of a thresholds body (every key but ``digest``)."""
    canon = {k: v for k, v in body.items() if k != DIGEST_KEY}
    text = json.dumps(canon, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


def thresholds_json(t: ThresholdFile) -> dict[str, object]:
    """The file body: the fields plus ``digest`` (what :func:`load_thresholds` checks)."""
    body: dict[str, object] = t.model_dump(mode="json", by_alias=True)
    body[DIGEST_KEY] = thresholds_digest(body)
    return body


def save_thresholds(path: str | Path, t: ThresholdFile) -> None:
    """Write ``thresholds.json`` atomically, with its content digest."""
    atomic_write_json(path, thresholds_json(t))


def load_thresholds(path: str | Path, *, allow_unsigned: bool = False) -> ThresholdFile:
    """Read ``thresholds.json``; refuse one that ngcal did not write, or that was edited since.

    A file without a ``digest``, or whose digest does not match its content, raises
    ArtifactError in one line. ``allow_unsigned=True`` is the explicit operator override
    (the caller audits and publishes it): a missing or mismatched digest is then accepted
    (the fields are still validated). Field errors name the file and the field.
    """
    raw = read_json(path)
    if not isinstance(raw, dict):
        raise ArtifactError(f"{path}: not a JSON object")
    digest = raw.pop(DIGEST_KEY, None)
    if digest is None and not allow_unsigned:
        raise ArtifactError(
            f"{path}: not written by ngcal (no content digest); recalibrate with "
            "`ngcal calibrate`, or load it as an explicit operator override"
        )
    if digest is not None and digest != thresholds_digest(raw) and not allow_unsigned:
        raise ArtifactError(
            f"{path}: content does not match its digest (edited after ngcal wrote it); "
            "recalibrate with `ngcal calibrate`"
        )
    try:
        return ThresholdFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ArtifactError(f"{path}: field {loc!r}: {first['msg']}") from e
