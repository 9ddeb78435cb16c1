"""The seam between the diffusion orchestration and its backends: requests, candidates, protocol.

A backend turns ``good image, target mask, references`` into NG candidates. Images are uint8
RGB [S, S, 3] at the scoring model's input size; masks are bool [S, S]. A candidate's image
equals the good image exactly outside its target mask (backends composite), so the gate can
check background integrity bit for bit.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


@dataclass(frozen=True)
class Reference:
    """One real NG image: uint8 RGB [S, S, 3], its bool mask [S, S], defect type and id."""

    image: np.ndarray
    mask: np.ndarray
    group: str
    item_id: str


@dataclass(frozen=True)
class Request:
    """Paint a ``group`` defect into ``good`` (uint8 RGB [S, S, 3]) inside ``target`` (bool)."""

    good: np.ndarray
    target: np.ndarray
    group: str


@dataclass(frozen=True)
class Candidate:
    """One generated NG image (uint8 RGB [S, S, 3], composited) and the backend's figures.

    ``crop`` is the generated window resized to the backend's working size (uint8 RGB
    [C, C, 3]) and ``crop_mask`` its bool mask: what the near-copy check compares against
    the backend's training crops. ``record`` holds JSON-able figures of how it was drawn.
    """

    image: np.ndarray
    crop: np.ndarray
    crop_mask: np.ndarray
    record: dict[str, object] = field(default_factory=dict)


class DefectBackend(Protocol):
    """A generator of NG candidates (``fewshot``, ``pretrained``)."""

    name: str

    def prepare(
        self, references: Sequence[Reference], goods: Sequence[np.ndarray], *, progress: bool
    ) -> dict[str, object]:
        """Train or load what the backend needs; returns a JSON-able record (timings...)."""
        ...

    def generate(
        self, requests: Sequence[Request], *, candidates: int, progress: bool
    ) -> list[list[Candidate]]:
        """``candidates`` NG candidates per request, in request order."""
        ...

    def training_crops(self) -> list[np.ndarray]:
        """The crops (uint8 RGB [C, C, 3]) the backend learnt from: near-copy evidence."""
        ...
