"""Bundle open (hash verification), thresholds binding, atomic install, rollback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from ngcal.core import bundle as bundle_mod
from ngcal.core.bundle import (
    install_bundle,
    open_bundle,
    open_installed,
    recover_install,
    rollback_bundle,
)
from ngcal.core.errors import ArtifactError
from ngcal.core.files import sha256_bytes
from ngcal.core.thresholds import ThresholdFile, save_thresholds
from ngcal.export.toy_bundle import write_toy_bundle


@pytest.fixture
def toy(tmp_path: Path) -> Path:
    return write_toy_bundle(tmp_path / "toy", image_size=32, thresholds=0.25)


def test_open_bundle_reads_manifest_thresholds_and_scoresets(toy: Path) -> None:
    """A freshly exported bundle opens; its fields come from the files on disk."""
    b = open_bundle(toy)
    assert b.root == toy
    assert b.manifest.files.keys() == {"model.onnx", "scores/normal_loo.json"}
    assert b.thresholds is not None and b.thresholds.value == 0.25
    assert b.thresholds.model_sha256 == b.model_sha256
    sets = b.scoresets()
    assert [s.source for s in sets] == ["normal_loo"] and len(sets[0]) == 20
    assert b.onnx_path == toy / "model.onnx" and b.image_size == 32


def test_flipped_byte_in_onnx_is_refused_naming_the_file(toy: Path) -> None:
    """One flipped byte in model.onnx (same size) -> ArtifactError naming model.onnx."""
    p = toy / "model.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.onnx.*sha256"):
        open_bundle(toy)


def test_truncated_scoreset_and_missing_file_refused(toy: Path) -> None:
    """A listed file that changed size or vanished is refused with its name."""
    s = toy / "scores" / "normal_loo.json"
    s.write_text(s.read_text()[:-10])
    with pytest.raises(ArtifactError, match="normal_loo.json"):
        open_bundle(toy)
    s.unlink()
    with pytest.raises(ArtifactError, match="missing"):
        open_bundle(toy)


def test_thresholds_are_unhashed_but_bound_to_the_model(toy: Path) -> None:
    """Recalibration may replace thresholds.json; one for another model is refused."""
    b = open_bundle(toy)
    save_thresholds(
        toy / "thresholds.json",
        ThresholdFile(
            value=0.4, version=2, mode="fixed", method="fixed", model_sha256=b.model_sha256
        ),
    )
    assert open_bundle(toy).thresholds.value == 0.4  # type: ignore[union-attr]
    save_thresholds(
        toy / "thresholds.json",
        ThresholdFile(value=0.4, mode="fixed", method="fixed", model_sha256=sha256_bytes(b"other")),
    )
    with pytest.raises(ArtifactError, match="thresholds belong to model"):
        open_bundle(toy)


def test_model_directory_and_incomplete_folder_are_not_bundles(toy: Path, tmp_path: Path) -> None:
    """A model-dir manifest is refused with a hint to export; no manifest = incomplete."""
    from ngcal.core.manifest import ModelManifest, write_manifest

    m = open_bundle(toy).manifest
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    write_manifest(
        model_dir,
        ModelManifest(backbone=m.backbone, preprocessing=m.preprocessing, patchcore=m.patchcore),
    )
    with pytest.raises(ArtifactError, match="model directory, not a bundle"):
        open_bundle(model_dir)
    (toy / "manifest.json").unlink()
    with pytest.raises(ArtifactError, match="no manifest.json"):
        open_bundle(toy)


def test_install_keeps_previous_and_rollback_swaps(tmp_path: Path) -> None:
    """Installing twice keeps the first as <dest>.prev; rollback brings it back."""
    a = write_toy_bundle(tmp_path / "a", image_size=32)
    b = write_toy_bundle(tmp_path / "b", image_size=48)
    dest = tmp_path / "dev" / "bundle"
    assert install_bundle(a, dest).image_size == 32
    assert install_bundle(b, dest).image_size == 48
    assert open_bundle(dest).image_size == 48
    assert open_bundle(tmp_path / "dev" / "bundle.prev").image_size == 32
    assert rollback_bundle(dest).image_size == 32
    assert open_bundle(tmp_path / "dev" / "bundle.prev").image_size == 48
    leftovers = [p.name for p in (tmp_path / "dev").iterdir()]
    assert sorted(leftovers) == ["bundle", "bundle.prev"]


def test_failure_mid_copy_leaves_old_bundle_loadable(tmp_path: Path) -> None:
    """A copy that dies after the first file leaves dest untouched and no temp folder."""
    a = write_toy_bundle(tmp_path / "a", image_size=32)
    b = write_toy_bundle(tmp_path / "b", image_size=48)
    dest = tmp_path / "dev" / "bundle"
    install_bundle(a, dest)
    calls = []

    def dying_copy(src: Path, dst: Path) -> None:
        calls.append(src.name)
        if len(calls) == 2:
            dst.write_bytes(src.read_bytes()[:5])  # half-written file, then power loss
            raise OSError(5, "simulated I/O error mid-copy")
        shutil.copy2(src, dst)

    with pytest.raises(OSError, match="simulated"):
        install_bundle(b, dest, _copy=dying_copy)
    assert len(calls) == 2
    assert open_bundle(dest).image_size == 32
    assert sorted(p.name for p in (tmp_path / "dev").iterdir()) == ["bundle"]


def test_crash_between_renames_is_recovered(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without renameat2, a crash after dest->prev is repaired: the old bundle comes back."""
    a = write_toy_bundle(tmp_path / "a", image_size=32)
    b = write_toy_bundle(tmp_path / "b", image_size=48)
    dest = tmp_path / "dev" / "bundle"
    install_bundle(a, dest)
    monkeypatch.setattr(bundle_mod, "_exchange", lambda x, y: False)
    real_rename = bundle_mod.os.rename

    def crash_on_second(src: object, dst: object) -> None:
        if Path(str(dst)) == dest:
            raise KeyboardInterrupt("power loss between the renames")
        real_rename(src, dst)  # type: ignore[arg-type]

    monkeypatch.setattr(bundle_mod.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        install_bundle(b, dest)
    monkeypatch.setattr(bundle_mod.os, "rename", real_rename)
    assert not dest.exists()  # the window the fallback has
    recover_install(dest)
    assert open_bundle(dest).image_size == 32
    assert open_installed(dest).image_size == 32
    assert install_bundle(b, dest).image_size == 48  # a retry then succeeds


def test_install_refuses_a_tampered_source(tmp_path: Path) -> None:
    """A source bundle that fails verification is never copied over a good one."""
    a = write_toy_bundle(tmp_path / "a", image_size=32)
    b = write_toy_bundle(tmp_path / "b", image_size=48)
    dest = tmp_path / "dev" / "bundle"
    install_bundle(a, dest)
    (b / "model.onnx").write_bytes(b"junk")
    with pytest.raises(ArtifactError, match="model.onnx"):
        install_bundle(b, dest)
    assert open_bundle(dest).image_size == 32


def test_hand_edited_or_foreign_thresholds_are_refused_in_one_line(toy: Path) -> None:
    """A thresholds.json edited by hand, or not written by ngcal, is refused; the override
    (allow_unsigned_thresholds) accepts it."""
    path = toy / "thresholds.json"
    body = json.loads(path.read_text())
    body["value"] = 1.0
    path.write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match="does not match its digest") as e:
        open_bundle(toy)
    assert "\n" not in str(e.value)
    del body["digest"]
    path.write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match="not written by ngcal"):
        open_bundle(toy)
    b = open_bundle(toy, allow_unsigned_thresholds=True)
    assert b.thresholds is not None and b.thresholds.value == 1.0


def test_manifest_disagreeing_with_the_graph_is_one_clear_line(toy: Path) -> None:
    """Outputs edited in the manifest: refused at open, naming both sides, in one line."""
    m = toy / "manifest.json"
    body = json.loads(m.read_text())
    body["outputs"] = ["image_score", "anomaly_map"]
    m.write_text(json.dumps(body))
    with pytest.raises(ArtifactError, match="outputs") as e:
        open_bundle(toy)
    assert "\n" not in str(e.value)


def test_input_shape_is_checked_against_fixed_graph_dims(tmp_path: Path) -> None:
    """A graph taking [N,3,32,32] and a manifest saying 48 px: one line naming both."""
    import onnx
    from onnx import TensorProto, helper

    from ngcal.core.bundle import check_graph

    x = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["N", 3, 32, 32])
    amap = helper.make_tensor_value_info("anomaly_map", TensorProto.FLOAT, ["N", 32, 32])
    score = helper.make_tensor_value_info("image_score", TensorProto.FLOAT, ["N"])
    nodes = [
        helper.make_node("ReduceMean", ["image"], ["anomaly_map"], axes=[1], keepdims=0),
        helper.make_node("ReduceMax", ["anomaly_map"], ["image_score"], axes=[1, 2], keepdims=0),
    ]
    model = helper.make_model(
        helper.make_graph(nodes, "g", [x], [amap, score]),
        opset_imports=[helper.make_opsetid("", 17)],
    )
    model.ir_version = 8
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    onnx.checker.check_model(str(path))
    toy_manifest = open_bundle(
        write_toy_bundle(tmp_path / "toy", image_size=32, thresholds=0.25)
    ).manifest
    check_graph(path, toy_manifest)  # 32 px: agrees
    bigger = toy_manifest.model_copy(
        update={"preprocessing": toy_manifest.preprocessing.model_copy(update={"image_size": 48})}
    )
    with pytest.raises(
        ArtifactError, match=r"input \[N,3,48,48\] but model.onnx takes \[\?,3,32,32\]"
    ):
        check_graph(path, bigger)


def test_graph_signature_without_the_onnx_package(
    toy: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The edge install has onnxruntime only: its session metadata gives the same answer."""
    import sys

    from ngcal.core.bundle import graph_signature

    with_onnx = graph_signature(toy / "model.onnx")
    monkeypatch.setitem(sys.modules, "onnx", None)
    assert graph_signature(toy / "model.onnx") == with_onnx
    assert with_onnx is not None and with_onnx[1] == ("anomaly_map", "image_score")
