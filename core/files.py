"""File primitives every artifact uses: sha256, atomic writes, directory fsync, JSON.

Atomic means: write to a temporary file in the same directory, fsync it, rename over the
target, fsync the directory. A reader sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .errors import ArtifactError

_CHUNK = 1 << 20


def sha256_file(path: str | os.PathLike[str]) -> str:
    """Hex sha256 of a file's bytes."""
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read for hashing ({e.strerror})") from e
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    """Hex sha256 of a byte string."""
    return hashlib.sha256(data).hexdigest()


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """fsync a directory so that a rename inside it is durable (no-op where unsupported)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Replace ``path`` with ``data`` atomically and durably."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        os.fchmod(fd, 0o644)  # mkstemp makes 0600; artifacts are meant to be shared read-only
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(target.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented UTF-8 JSON, atomically."""
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: str | os.PathLike[str]) -> Any:
    """Read a JSON file; errors name the file."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: file not found") from e
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    except OSError as e:
        raise ArtifactError(f"{path}: cannot read ({e.strerror})") from e


def save_npy(path: str | os.PathLike[str], array: np.ndarray) -> None:
    """Save an array as ``.npy`` atomically (never pickled)."""
    import io

    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(array), allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())


def load_npy(path: str | os.PathLike[str]) -> np.ndarray:
    """Load a ``.npy`` array with pickles refused; errors name the file."""
    try:
        arr: np.ndarray = np.load(path, allow_pickle=False)
        return arr
    except FileNotFoundError as e:
        raise ArtifactError(f"{path}: file not found") from e
    except (ValueError, OSError) as e:
        raise ArtifactError(f"{path}: not a valid .npy array ({e})") from e
