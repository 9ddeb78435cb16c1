"""Exported bundles: hash-verified open, and atomic install that keeps the previous one.

A bundle is a folder (see ``ngcal.core.manifest.BundleManifest``)::

    manifest.json      BundleManifest, written last; sha256 + size of every file below
    model.onnx         image [N,3,S,S] float32 -> anomaly_map [N,S,S], image_score [N]
    scores/*.json      score sets copied from the model directory at export time
    thresholds.json    optional ThresholdFile (NOT hashed, see below)
    engines/           TensorRT engines built on the device (NOT hashed; cached by key)

What the manifest hashes, and why: everything written by ``ngcal export`` except
``thresholds.json``. Thresholds are recalibrated on the device (``ngcal.calibration``,
the daemon) and replaced atomically on their own; hashing them would force a re-export for
every recalibration, which the architecture rules out. A thresholds file is instead bound
to the model by its ``model_sha256`` field, which must equal the bundle's ``model_sha256``
(or be empty). If an exporter *does* list ``thresholds.json`` in the manifest, it is
verified like every other listed file. Score sets added after export (``real_ng``,
``real_ok`` collected on the line) are unlisted; ``Bundle.scoresets()`` reads them too,
and the listed ones are verified at open.

Installing (``install_bundle``) copies into a temporary sibling, fsyncs every file and
directory, verifies the copy, then swaps it in with one atomic ``renameat2(EXCHANGE)``
where the kernel offers it (Linux >= 3.15) or two renames otherwise; the bundle it
replaces is kept as ``<dest>.prev``. ``recover_install`` (called by ``install_bundle`` and
``open_installed``) repairs the one window the two-rename fallback has.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .errors import ArtifactError
from .files import fsync_dir, read_json
from .manifest import MANIFEST_NAME, BundleManifest, read_manifest
from .scoresets import SCORESET_SCHEMA, ScoreSet
from .thresholds import ThresholdFile, load_thresholds

log = logging.getLogger(__name__)

THRESHOLDS_NAME = "thresholds.json"
SCORES_DIR = "scores"
PREV_SUFFIX = ".prev"
_TMP_PREFIX = ".ngcal-install-"
#: Installed bundles are world-readable (the daemon may run as another user); never writable.
_FILE_MODE, _DIR_MODE = 0o644, 0o755


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk.

    ``model_sha256`` is the identity of the source model (sha256 of its manifest.json); score
    sets and thresholds name it. ``thresholds`` is None when the bundle has none.
    """

    root: Path
    manifest: BundleManifest
    thresholds: ThresholdFile | None

    @property
    def model_sha256(self) -> str:
        """sha256 of the source model directory's manifest.json."""
        return self.manifest.model_sha256

    @property
    def onnx_path(self) -> Path:
        """Path of the ONNX graph inside the bundle."""
        return self.root / self.manifest.onnx

    @property
    def image_size(self) -> int:
        """Square input side S in pixels."""
        return self.manifest.preprocessing.image_size

    def scoresets(self) -> list[ScoreSet]:
        """Score sets under ``scores/``: the hashed ones (verified at open) and any added later."""
        folder = self.root / SCORES_DIR
        if not folder.is_dir():
            return []
        out: list[ScoreSet] = []
        for f in sorted(folder.rglob("*.json")):
            if f.name.startswith("."):
                continue
            obj = read_json(f)
            if isinstance(obj, dict) and obj.get("schema") == SCORESET_SCHEMA:
                out.append(ScoreSet.from_json(obj, where=str(f)))
        return out


def open_bundle(path: str | os.PathLike[str], *, allow_unsigned_thresholds: bool = False) -> Bundle:
    """Open a bundle folder, verifying every listed file's sha256 and size.

    Raises ArtifactError naming the folder and file on any mismatch, on a model directory
    passed where a bundle is expected, on a manifest that disagrees with its ONNX graph
    (input shape, outputs), on a thresholds file bound to another model, and on a thresholds
    file ngcal did not write or that was edited since (unless ``allow_unsigned_thresholds``,
    the operator override, see :func:`ngcal.core.thresholds.load_thresholds`).
    """
    root = Path(path)
    manifest = read_manifest(root, verify=True)
    if not isinstance(manifest, BundleManifest):
        raise ArtifactError(
            f"{root}: is a model directory, not a bundle (run `ngcal export --model {root}`)"
        )
    onnx_name = manifest.onnx
    if onnx_name not in manifest.files:
        raise ArtifactError(f"{root}: manifest does not list its ONNX file {onnx_name!r}")
    check_graph(root / onnx_name, manifest)
    thresholds = _read_thresholds(root, manifest, allow_unsigned=allow_unsigned_thresholds)
    log.debug("opened bundle %s (model %s)", root, manifest.model_sha256[:12])
    return Bundle(root=root, manifest=manifest, thresholds=thresholds)


Dims = tuple[int | None, ...]


def graph_signature(onnx_path: Path) -> tuple[Dims, tuple[str, ...]] | None:
    """(first input's dims, output names) of an ONNX graph; None dims are symbolic.

    Reads the graph with the ``onnx`` package when installed, else asks onnxruntime (the
    edge install) for the session's metadata with graph optimisation off; None when
    neither is installed. A graph neither can read raises ArtifactError.
    """
    try:
        import onnx
    except ImportError:  # the edge install: onnxruntime only
        onnx = None  # type: ignore[assignment]
    try:
        if onnx is not None:
            g = onnx.load(str(onnx_path), load_external_data=False).graph
            init = {i.name for i in g.initializer}
            first = next(i for i in g.input if i.name not in init)
            dims = tuple(
                int(d.dim_value) if d.HasField("dim_value") else None
                for d in first.type.tensor_type.shape.dim
            )
            return dims, tuple(o.name for o in g.output)
        try:
            import onnxruntime as ort
        except ImportError:
            return None
        opts = ort.SessionOptions()
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        sess = ort.InferenceSession(str(onnx_path), opts, providers=["CPUExecutionProvider"])
        shape = sess.get_inputs()[0].shape
        return (
            tuple(d if isinstance(d, int) else None for d in shape),
            tuple(o.name for o in sess.get_outputs()),
        )
    except Exception as e:  # a foreign parser's error, kept inside the error tree
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ArtifactError(f"{onnx_path}: not a readable ONNX graph ({reason})") from e


def check_graph(onnx_path: Path, manifest: BundleManifest) -> None:
    """The manifest's input shape [N,3,H,W] and output names must match the ONNX graph.

    One line naming both on mismatch (a hand-edited ``image_size`` would otherwise fail
    later inside onnxruntime). Symbolic graph dims match any value.
    """
    sig = graph_signature(onnx_path)
    if sig is None:
        log.debug("%s: neither onnx nor onnxruntime installed; graph not checked", onnx_path)
        return
    dims, outputs = sig
    h, w = manifest.preprocessing.hw
    want: Dims = (None, 3, h, w)

    def show(d: Dims) -> str:
        return "[" + ",".join("?" if v is None else str(v) for v in d) + "]"

    ok = len(dims) == 4 and all(
        g is None or e is None or g == e for g, e in zip(dims, want, strict=True)
    )
    if not ok:
        raise ArtifactError(
            f"{onnx_path.parent}: manifest says input [N,3,{h},{w}] but {onnx_path.name} "
            f"takes {show(dims)}; re-export the bundle"
        )
    if tuple(manifest.outputs) != outputs:
        raise ArtifactError(
            f"{onnx_path.parent}: manifest says outputs {list(manifest.outputs)} but "
            f"{onnx_path.name} has {list(outputs)}; re-export the bundle"
        )


def _read_thresholds(
    root: Path, manifest: BundleManifest, *, allow_unsigned: bool
) -> ThresholdFile | None:
    path = root / THRESHOLDS_NAME
    if not path.is_file():
        return None
    t = load_thresholds(path, allow_unsigned=allow_unsigned)
    fraction = manifest.extra.get("bank_fraction", "1")
    if float(fraction) < 1.0:
        raise ArtifactError(
            f"{path}: this bundle keeps only a fraction {fraction} of its model's memory bank, "
            "so thresholds calibrated on the full model do not apply; fit with the smaller "
            "--coreset-ratio and calibrate that model instead"
        )
    if t.model_sha256 and t.model_sha256 != manifest.model_sha256:
        raise ArtifactError(
            f"{path}: thresholds belong to model {t.model_sha256[:12]}..., "
            f"this bundle holds model {manifest.model_sha256[:12]}..."
        )
    return t


# --------------------------------------------------------------------------- install


def _copy_tree_durable(src: Path, dst: Path, copy: Callable[[Path, Path], object]) -> None:
    """Copy ``src`` into the existing empty folder ``dst``; fsync every file and folder."""
    for dirpath, dirnames, filenames in os.walk(src):
        dirnames.sort()
        rel = Path(dirpath).relative_to(src)
        target_dir = dst / rel
        target_dir.mkdir(parents=True, exist_ok=True)
        for name in sorted(filenames):
            if name.startswith("."):
                continue
            target = target_dir / name
            copy(Path(dirpath) / name, target)
            os.chmod(target, _FILE_MODE)
            with open(target, "rb+") as f:
                os.fsync(f.fileno())
    for dirpath, _, _ in os.walk(dst, topdown=False):
        os.chmod(dirpath, _DIR_MODE)
        fsync_dir(dirpath)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with renameat2(RENAME_EXCHANGE); False where unsupported."""
    libc_name = ctypes.util.find_library("c")
    if not libc_name:
        return False
    try:
        libc = ctypes.CDLL(libc_name, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    rc = fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange)
    if rc == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise ArtifactError(f"{b}: cannot swap in the new bundle ({os.strerror(err)})")


def recover_install(dest: str | os.PathLike[str]) -> None:
    """Repair an install interrupted between its two renames, and drop stale temp folders.

    If ``dest`` is missing but ``<dest>.prev`` exists, the previous bundle is put back.
    """
    dest = Path(dest)
    prev = dest.with_name(dest.name + PREV_SUFFIX)
    if not dest.exists() and prev.is_dir():
        log.warning("%s: interrupted install found; restoring the previous bundle", dest)
        os.rename(prev, dest)
        fsync_dir(dest.parent)
    if dest.parent.is_dir():
        for stale in dest.parent.glob(f"{_TMP_PREFIX}{dest.name}-*"):
            shutil.rmtree(stale, ignore_errors=True)


def install_bundle(
    src: str | os.PathLike[str],
    dest: str | os.PathLike[str],
    *,
    _copy: Callable[[Path, Path], object] = shutil.copy2,
) -> Bundle:
    """Install bundle ``src`` at ``dest`` atomically; the replaced one becomes ``<dest>.prev``.

    ``src`` is verified before copying and the copy is verified before the swap, so a
    reader of ``dest`` sees the old bundle or the new one, complete. A failure at any step
    leaves the old bundle in place and loadable. ``_copy`` is a test seam.
    """
    src, dest = Path(src), Path(dest)
    open_bundle(src)
    dest.parent.mkdir(parents=True, exist_ok=True)
    recover_install(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f"{_TMP_PREFIX}{dest.name}-", dir=dest.parent))
    try:
        _copy_tree_durable(src, tmp, _copy)
        installed = open_bundle(tmp)
        prev = dest.with_name(dest.name + PREV_SUFFIX)
        if dest.exists():
            if prev.exists():
                shutil.rmtree(prev)  # the one before the previous is dropped
            if _exchange(tmp, dest):
                # tmp now holds the old bundle; keep it as .prev
                fsync_dir(dest.parent)
                os.rename(tmp, prev)
            else:
                os.rename(dest, prev)  # a crash here is repaired by recover_install
                os.rename(tmp, dest)
        else:
            os.rename(tmp, dest)
        fsync_dir(dest.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.info("installed bundle %s at %s", installed.model_sha256[:12], dest)
    return Bundle(root=dest, manifest=installed.manifest, thresholds=installed.thresholds)


def rollback_bundle(dest: str | os.PathLike[str]) -> Bundle:
    """Swap ``dest`` with ``<dest>.prev`` (both verified first); returns the bundle now at dest."""
    dest = Path(dest)
    prev = dest.with_name(dest.name + PREV_SUFFIX)
    if not prev.is_dir():
        raise ArtifactError(f"{prev}: no previous bundle to roll back to")
    open_bundle(prev)
    if not _exchange(prev, dest):
        tmp = dest.with_name(dest.name + ".rollback")
        os.rename(dest, tmp)
        os.rename(prev, dest)
        os.rename(tmp, prev)
    fsync_dir(dest.parent)
    return open_bundle(dest)


def open_installed(dest: str | os.PathLike[str]) -> Bundle:
    """``recover_install`` then ``open_bundle``: what a daemon calls at start-up."""
    recover_install(dest)
    return open_bundle(dest)


__all__ = [
    "MANIFEST_NAME",
    "PREV_SUFFIX",
    "THRESHOLDS_NAME",
    "Bundle",
    "install_bundle",
    "open_bundle",
    "open_installed",
    "recover_install",
    "rollback_bundle",
]
