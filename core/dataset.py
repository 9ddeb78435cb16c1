"""Data layouts: MVTec-AD category folders and plain folders of images.

MVTec-AD layout::

    <category>/train/good/*.png
    <category>/test/good/*.png
    <category>/test/<defect>/*.png
    <category>/ground_truth/<defect>/<stem>_mask.png

A plain folder is every image file below it (recursively), all unlabelled.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .errors import DataError
from .images import IMAGE_SUFFIXES


@dataclass(frozen=True)
class Sample:
    """One image: path, label (0 good, 1 defective, None unknown), defect type, mask path."""

    path: Path
    label: int | None
    defect: str
    mask: Path | None = None

    @property
    def item_id(self) -> str:
        """A stable id: ``<split>/<defect>/<file name>`` for MVTec layouts, else the name."""
        parts = self.path.parts
        return "/".join(parts[-3:]) if len(parts) >= 3 else self.path.name


@dataclass(frozen=True)
class Category:
    """A category folder split into train (good only) and test samples."""

    root: Path
    train: tuple[Sample, ...]
    test: tuple[Sample, ...]

    @property
    def defects(self) -> tuple[str, ...]:
        """Defect type names present in the test split."""
        return tuple(sorted({s.defect for s in self.test if s.label == 1}))


def list_images(folder: str | Path) -> list[Path]:
    """Image files below ``folder``, sorted; DataError when there is none."""
    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"{root}: not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise DataError(f"{root}: no image files ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return files


def is_mvtec_category(folder: str | Path) -> bool:
    """True when ``folder`` has ``train/good``."""
    return (Path(folder) / "train" / "good").is_dir()


def load_category(folder: str | Path) -> Category:
    """Read an MVTec-AD category folder (test split optional)."""
    root = Path(folder)
    if not is_mvtec_category(root):
        raise DataError(f"{root}: not an MVTec-AD category (no train/good folder)")
    train = tuple(Sample(p, 0, "good") for p in list_images(root / "train" / "good"))
    test: list[Sample] = []
    test_root = root / "test"
    if test_root.is_dir():
        for d in sorted(x for x in test_root.iterdir() if x.is_dir()):
            for p in list_images(d):
                if d.name == "good":
                    test.append(Sample(p, 0, "good"))
                    continue
                mask = root / "ground_truth" / d.name / f"{p.stem}_mask.png"
                test.append(Sample(p, 1, d.name, mask if mask.is_file() else None))
    return Category(root=root, train=train, test=tuple(test))


def training_images(folder: str | Path) -> list[Path]:
    """Good images to fit on: ``train/good`` of a category, or every image of a plain folder."""
    if is_mvtec_category(folder):
        return [s.path for s in load_category(folder).train]
    return list_images(folder)
