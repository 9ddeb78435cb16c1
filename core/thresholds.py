"""``thresholds.json``: a threshold with its method, evidence and expected error rates.

Written by ``ngcal calibrate`` and by the daemon's recalibration; it names the model it
belongs to by sha256 and never lives inside the model graph, so recalibrating never needs
re-exporting. ``ngcal.calibration`` owns the logic; this module owns the file format.
"""

from __future__ import annotations

import datetime as _dt
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
    """A point estimate with a two-sided interval at ``level`` confidence."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    value: float | None
    low: float | None = None
    high: float | None = None
    level: float = 0.95


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
    model_sha256: str = ""
    parent_version: int | None = None
    created_at: str = Field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )
    created_by: str = "ngcal calibrate"
    notes: dict[str, float | int | str | None] = Field(default_factory=dict)


def save_thresholds(path: str | Path, t: ThresholdFile) -> None:
    """Write ``thresholds.json`` atomically."""
    atomic_write_json(path, t.model_dump(mode="json", by_alias=True))


def load_thresholds(path: str | Path) -> ThresholdFile:
    """Read ``thresholds.json``; errors name the file and the field."""
    raw = read_json(path)
    try:
        return ThresholdFile.model_validate(raw)
    except ValidationError as e:
        first = e.errors()[0]
        loc = ".".join(str(x) for x in first["loc"])
        raise ArtifactError(f"{path}: field {loc!r}: {first['msg']}") from e
