"""Score sets: tagged lists of image scores that calibration consumes.

A score set is one JSON file (small, diffable, no pickle)::

    {"schema": "ngcal.scoreset/1", "source": "glass_feature", "severity": 1.5,
     "model_sha256": "...", "created_at": "...", "meta": {...},
     "items": [{"id": "train/good/000.png#3", "score": 1.234, "group": "crack"}, ...]}

``source`` is one of SOURCES. Normal sources (``normal_*``, ``real_ok``) are OK evidence;
the others are NG evidence. ``group`` is optional per item (defect type, Perlin mode...).
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, cast, get_args

import numpy as np

from .errors import ArtifactError
from .files import atomic_write_json, read_json

SCORESET_SCHEMA = "ngcal.scoreset/1"

Source = Literal[
    "normal_loo",
    "normal_holdout",
    "glass_feature",
    "glass_image",
    "diffusion",
    "real_ng",
    "real_ok",
]
SOURCES: tuple[str, ...] = get_args(Source)
NORMAL_SOURCES = frozenset({"normal_loo", "normal_holdout", "real_ok"})
SYNTHETIC_SOURCES = frozenset({"glass_feature", "glass_image", "diffusion"})


def is_ng_source(source: str) -> bool:
    """True where the set's items are defective (NG) evidence."""
    return source not in NORMAL_SOURCES


@dataclass(frozen=True)
class ScoreSet:
    """Scores of items from one source (and one severity, where it applies).

    ``scores`` is float64 [N]; ``item_ids`` and ``groups`` have N entries each.
    """

    source: Source
    scores: np.ndarray
    item_ids: tuple[str, ...]
    severity: float | None = None
    groups: tuple[str, ...] | None = None
    model_sha256: str = ""
    meta: dict[str, Any] = field(default_factory=dict)
    created_at: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ArtifactError(f"score set source {self.source!r} is not one of {SOURCES}")
        scores = np.asarray(self.scores, dtype=np.float64).reshape(-1)
        object.__setattr__(self, "scores", scores)
        object.__setattr__(self, "item_ids", tuple(str(i) for i in self.item_ids))
        if len(self.item_ids) != scores.size:
            raise ArtifactError(
                f"score set {self.source}: {scores.size} scores but {len(self.item_ids)} item ids"
            )
        if self.groups is not None:
            object.__setattr__(self, "groups", tuple(str(g) for g in self.groups))
            if len(self.groups) != scores.size:
                raise ArtifactError(
                    f"score set {self.source}: {scores.size} scores but {len(self.groups)} groups"
                )
        if not np.all(np.isfinite(scores)):
            raise ArtifactError(f"score set {self.source}: non-finite scores")

    @property
    def is_ng(self) -> bool:
        """True where this set is NG evidence."""
        return is_ng_source(self.source)

    def __len__(self) -> int:
        return int(self.scores.size)

    @property
    def content_sha256(self) -> str:
        """sha256 of what calibration reads: source, severity and the items (id, score, group).

        Independent of ``model_sha256``, ``meta``, ``created_at`` and file formatting, so a
        set keeps its digest when ``ngcal export`` re-tags it with the model's sha256.
        """
        body = self.to_json()
        canon = {"source": body["source"], "severity": body["severity"], "items": body["items"]}
        text = json.dumps(canon, sort_keys=True, separators=(",", ":"), allow_nan=False)
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def file_name(self) -> str:
        """A stable file name from source, severity and content: ``glass_image@1-<sha12>.json``."""
        tag = self.source if self.severity is None else f"{self.source}@{self.severity:g}"
        return f"{tag}-{self.content_sha256[:12]}.json"

    def to_json(self) -> dict[str, Any]:
        """The file representation."""
        items = []
        for i, (iid, s) in enumerate(zip(self.item_ids, self.scores.tolist(), strict=False)):
            item: dict[str, Any] = {"id": iid, "score": s}
            if self.groups is not None:
                item["group"] = self.groups[i]
            items.append(item)
        return {
            "schema": SCORESET_SCHEMA,
            "source": self.source,
            "severity": self.severity,
            "model_sha256": self.model_sha256,
            "created_at": self.created_at,
            "meta": self.meta,
            "items": items,
        }

    @classmethod
    def from_json(cls, obj: Any, *, where: str = "score set") -> ScoreSet:
        """Parse the file representation; errors name ``where`` and the field."""
        if not isinstance(obj, dict) or obj.get("schema") != SCORESET_SCHEMA:
            raise ArtifactError(f"{where}: not a {SCORESET_SCHEMA} file")
        try:
            items = obj["items"]
            ids = [str(it["id"]) for it in items]
            scores = [float(it["score"]) for it in items]
            has_group = any("group" in it for it in items)
            groups = tuple(str(it.get("group", "")) for it in items) if has_group else None
            sev = obj.get("severity")
            severity = None if sev is None else float(sev)
        except (KeyError, TypeError, ValueError) as e:
            raise ArtifactError(f"{where}: malformed items ({e!r})") from e
        if severity is not None and not math.isfinite(severity):
            raise ArtifactError(f"{where}: field 'severity' is not finite")
        return cls(
            source=cast(Source, obj.get("source")),
            scores=np.asarray(scores, dtype=np.float64),
            item_ids=tuple(ids),
            severity=severity,
            groups=groups,
            model_sha256=str(obj.get("model_sha256", "")),
            meta=dict(obj.get("meta") or {}),
            created_at=str(obj.get("created_at", "")),
        )


def evidence_dir(thresholds: str | Path) -> Path:
    """The folder beside a ``thresholds.json`` holding the score sets it rests on.

    ``ngcal calibrate --out T`` writes them to ``T.scores/`` (``thresholds.scores/``);
    ``ngcal export --thresholds T`` copies each one the thresholds name into the bundle.
    """
    t = Path(thresholds)
    return t.with_name(t.stem + ".scores")


def save_scoreset(path: str | Path, scoreset: ScoreSet) -> None:
    """Write a score set atomically."""
    atomic_write_json(path, scoreset.to_json())


def load_scoreset(path: str | Path) -> ScoreSet:
    """Read one score set file."""
    return ScoreSet.from_json(read_json(path), where=str(path))


def load_scoresets(paths: Iterable[str | Path]) -> list[ScoreSet]:
    """Read score sets from files and folders (every ``*.json`` with the score set schema)."""
    out: list[ScoreSet] = []
    for p in map(Path, paths):
        if p.is_dir():
            for f in sorted(p.rglob("*.json")):
                obj = read_json(f)
                if isinstance(obj, dict) and obj.get("schema") == SCORESET_SCHEMA:
                    out.append(ScoreSet.from_json(obj, where=str(f)))
        elif p.is_file():
            out.append(load_scoreset(p))
        else:
            raise ArtifactError(f"{p}: no such score set file or folder")
    return out


def concat(sets: Sequence[ScoreSet]) -> np.ndarray:
    """All scores of ``sets`` in one float64 array."""
    if not sets:
        return np.zeros(0, dtype=np.float64)
    return np.concatenate([s.scores for s in sets])
