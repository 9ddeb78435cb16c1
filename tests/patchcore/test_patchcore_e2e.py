"""End to end on a small subset of the shared data: ``ngcal fit`` + ``ngcal evaluate`` via the
CLI, leave-one-out and cross-fitted scores, unreadable and grayscale inputs, tampering."""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from ngcal.cli.main import main  # noqa: E402
from ngcal.core.errors import ArtifactError  # noqa: E402
from ngcal.core.manifest import ModelManifest, read_manifest  # noqa: E402
from ngcal.core.scoresets import load_scoreset  # noqa: E402

pytestmark = pytest.mark.torch


def test_fit_writes_a_verified_model_dir(small_model: Path) -> None:
    """The model dir verifies, and its manifest records bank size, stats and both score sets."""
    m = read_manifest(small_model, verify=True)
    assert isinstance(m, ModelManifest)
    pc = m.patchcore
    assert pc.num_train_images == 16 and pc.feature_map_size == (16, 16)
    assert {"loo_patch_nn_p50", "loo_patch_nn_p90", "loo_patch_nn_p99"} <= set(pc.stats)
    assert (
        pc.stats["loo_patch_nn_p50"] <= pc.stats["loo_patch_nn_p90"] <= pc.stats["loo_patch_nn_p99"]
    )
    assert {
        "memory_bank.npy",
        "memory_bank_source.npy",
        "scores/normal_loo.json",
        "scores/normal_holdout.json",
        "backbone.safetensors",
    } <= set(m.files)
    loo = load_scoreset(small_model / "scores" / "normal_loo.json")
    hold = load_scoreset(small_model / "scores" / "normal_holdout.json")
    assert loo.source == "normal_loo" and hold.source == "normal_holdout"
    assert len(loo) == len(hold) == 16 and loo.item_ids == hold.item_ids
    assert hold.groups is not None and len(set(hold.groups)) == 4


def test_evaluate_json_and_csv(
    small_model: Path, small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ngcal evaluate --json` prints the agreed keys; --csv writes one row per test image."""
    out_csv = tmp_path / "scores.csv"
    rc = main(
        [
            "evaluate",
            "--model",
            str(small_model),
            "--data",
            str(small_category),
            "--json",
            "--csv",
            str(out_csv),
            "--quiet",
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("image_auroc", "pixel_auroc", "f1_oracle", "threshold_oracle"):
        assert key in res
    assert 0.0 <= res["image_auroc"] <= 1.0 and 0.0 <= res["pixel_auroc"] <= 1.0
    with out_csv.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and set(rows[0]) == {"item_id", "path", "label", "defect", "score"}
    assert {r["label"] for r in rows} == {"0", "1"}
    assert all(np.isfinite(float(r["score"])) for r in rows)


def test_evaluate_reports_threshold_quality(
    small_model: Path, small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """With thresholds.json, --json adds fpr/fnr/f1 gap and a cost regret >= 0."""
    from ngcal.core.thresholds import OperatingPoint, ThresholdFile, save_thresholds

    model = tmp_path / "m"
    shutil.copytree(small_model, model)
    loo = load_scoreset(model / "scores" / "normal_loo.json")
    t = ThresholdFile(
        value=float(np.max(loo.scores)),
        mode="target_fpr",
        method="max",
        target_fpr=0.05,
        operating_point=OperatingPoint(),
    )
    save_thresholds(model / "thresholds.json", t)
    assert (
        main(
            ["evaluate", "--model", str(model), "--data", str(small_category), "--json", "--quiet"]
        )
        == 0
    )
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["threshold"] == t.value and res["mode"] == "target_fpr"
    assert res["f1_gap"] >= 0 and res["cost_regret"] >= -1e-12
    assert 0 <= res["fpr"] <= 1 and 0 <= res["fnr"] <= 1


def test_loo_scores_exclude_own_rows(small_model: Path, small_category: Path) -> None:
    """LOO score of a training image = its score against the bank minus its own rows, and is
    above its score against the full bank (which contains its own patches)."""
    from ngcal.patchcore.io import load_batch, load_model
    from ngcal.patchcore.nn_search import nearest

    loaded = load_model(small_model)
    loo = load_scoreset(small_model / "scores" / "normal_loo.json")
    source = torch.from_numpy(np.load(small_model / "memory_bank_source.npy")).long()
    i = int(torch.bincount(source).argmax())  # the image that owns the most bank rows
    path = small_category / loo.item_ids[i]
    x, ok, _ = load_batch([path], loaded.preprocessing)
    module = loaded.module
    with torch.inference_mode():
        feats = module.embed(torch.from_numpy(x))
        q = feats.reshape(-1, feats.shape[-1])
        d_excl, _ = nearest(q, module.memory_bank, exclude=source == i)
        full = float(module(torch.from_numpy(x))[1][0])
    k = min(module.topk, d_excl.numel())
    expected = float(d_excl.topk(k).values.mean())
    assert loo.scores[i] == pytest.approx(expected, rel=1e-4)
    assert loo.scores[i] > full


def test_unreadable_image_is_reported_by_name(
    small_model: Path, small_category: Path, tmp_path: Path
) -> None:
    """score_paths gives NaN and an error naming the broken file; the others are scored."""
    from ngcal.patchcore.io import load_model, score_paths

    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    good = next((small_category / "test" / "good").iterdir())
    res = score_paths(load_model(small_model), [good, bad], with_maps=False)
    assert np.isfinite(res.scores[0]) and np.isnan(res.scores[1])
    assert res.errors and res.errors[0][0] == str(bad)


def test_fit_refuses_unreadable_training_image(
    small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`ngcal fit` on a folder with a broken image exits 2 and names the file."""
    folder = tmp_path / "plain"
    folder.mkdir()
    for p in sorted((small_category / "train" / "good").iterdir())[:3]:
        shutil.copy(p, folder / p.name)
    (folder / "zz_broken.png").write_bytes(b"")
    rc = main(
        [
            "fit",
            "--data",
            str(folder),
            "--out",
            str(tmp_path / "m"),
            "--image-size",
            "64",
            "--cv-folds",
            "0",
            "--quiet",
        ]
    )
    assert rc == 2
    assert "zz_broken.png" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()


def test_grayscale_and_any_size_inputs(
    small_model: Path, small_category: Path, tmp_path: Path
) -> None:
    """Grayscale, RGB and odd-sized versions of one image all score; gray == replicated RGB."""
    from PIL import Image

    from ngcal.patchcore.io import load_model, score_paths

    src = next((small_category / "test" / "good").iterdir())
    gray = Image.open(src).convert("L")
    gray.save(tmp_path / "gray.png")
    gray.convert("RGB").save(tmp_path / "rgb.png")
    gray.resize((301, 173)).save(tmp_path / "odd.png")
    res = score_paths(
        load_model(small_model), [tmp_path / n for n in ("gray.png", "rgb.png", "odd.png")]
    )
    assert not res.errors and np.all(np.isfinite(res.scores))
    assert res.scores[0] == pytest.approx(res.scores[1], rel=1e-6)
    assert res.maps is not None and res.maps.shape == (3, 128, 128)


def test_tampered_model_dir_is_refused(small_model: Path, tmp_path: Path) -> None:
    """Changing one byte of the memory bank makes load_model raise ArtifactError naming it."""
    from ngcal.patchcore.io import load_model

    model = tmp_path / "m"
    shutil.copytree(small_model, model)
    bank = model / "memory_bank.npy"
    data = bytearray(bank.read_bytes())
    data[-1] ^= 0xFF
    bank.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="memory_bank.npy"):
        load_model(model)


def test_forward_is_onnx_exportable(small_model: Path, tmp_path: Path) -> None:
    """The PatchCore module exports to ONNX opset 17 with a dynamic batch and matches torch."""
    import onnxruntime as ort

    from ngcal.patchcore.io import load_model

    module = load_model(small_model).module
    x = torch.randn(2, 3, 128, 128)
    path = tmp_path / "m.onnx"
    with warnings.catch_warnings():  # the legacy exporter's deprecation and tracer notes
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (x,),
            str(path),
            input_names=["image"],
            output_names=["anomaly_map", "image_score"],
            opset_version=17,
            dynamo=False,
            dynamic_axes={"image": {0: "n"}, "anomaly_map": {0: "n"}, "image_score": {0: "n"}},
        )
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x3 = torch.randn(3, 3, 128, 128)
    amap, score = sess.run(None, {"image": x3.numpy()})
    with torch.inference_mode():
        ref_map, ref_score = module(x3)
    assert np.allclose(score, ref_score.numpy(), atol=1e-3)
    assert np.allclose(amap, ref_map.numpy(), atol=1e-3)


def test_evaluate_bundle_matches_model_dir(
    small_model: Path, small_category: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An exported bundle, evaluated through onnxruntime, gives the model dir's scores."""

    bundle = tmp_path / "bundle"
    assert main(["export", "--model", str(small_model), "--out", str(bundle)]) == 0
    capsys.readouterr()
    rows = {}
    for name, src in (("model", small_model), ("bundle", bundle)):
        out_csv = tmp_path / f"{name}.csv"
        rc = main(
            [
                "evaluate",
                "--model",
                str(src),
                "--data",
                str(small_category),
                "--json",
                "--csv",
                str(out_csv),
                "--quiet",
            ]
        )
        assert rc == 0
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        assert res["kind"] == name
        with out_csv.open(newline="") as f:
            rows[name] = {r["item_id"]: float(r["score"]) for r in csv.DictReader(f)}
    assert rows["model"].keys() == rows["bundle"].keys()
    for k, v in rows["model"].items():
        assert rows["bundle"][k] == pytest.approx(v, rel=1e-3, abs=1e-3)


@pytest.mark.slow
def test_full_tile_fit_reaches_detection_goal(
    tile_data: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Defaults on all of train/good: image AUROC >= 0.93 on the full test split, and the
    cross-fitted normal scores hold their p99 on test/good (FPR <= 3%)."""
    model = tmp_path / "model"
    assert main(["fit", "--data", str(tile_data), "--out", str(model), "--quiet"]) == 0
    capsys.readouterr()
    out_csv = tmp_path / "s.csv"
    rc = main(
        [
            "evaluate",
            "--model",
            str(model),
            "--data",
            str(tile_data),
            "--json",
            "--quiet",
            "--csv",
            str(out_csv),
        ]
    )
    assert rc == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["image_auroc"] >= 0.93
    hold = load_scoreset(model / "scores" / "normal_holdout.json").scores
    with out_csv.open(newline="") as f:
        good = np.array([float(r["score"]) for r in csv.DictReader(f) if r["label"] == "0"])
    assert np.mean(good >= np.quantile(hold, 0.99)) <= 0.03


def test_fit_plain_folder_with_wrn50_checkpoint(small_category: Path, tmp_path: Path) -> None:
    """A plain image folder fits with WRN50 (layers 2+3) from a local checkpoint: 1536-dim
    bank, ImageNet normalisation, item ids relative to the folder."""
    from safetensors.torch import save_file

    from ngcal.patchcore.backbones import WRN50, create_features_model

    ckpt = tmp_path / "wrn.safetensors"
    sd = create_features_model(WRN50, (2, 3)).state_dict()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(ckpt))
    folder = tmp_path / "plain" / "sub"
    folder.mkdir(parents=True)
    for p in sorted((small_category / "train" / "good").iterdir())[:4]:
        shutil.copy(p, folder / p.name)
    out = tmp_path / "m"
    rc = main(
        [
            "fit",
            "--data",
            str(tmp_path / "plain"),
            "--out",
            str(out),
            "--backbone",
            WRN50,
            "--weights",
            str(ckpt),
            "--image-size",
            "64",
            "--cv-folds",
            "2",
            "--quiet",
        ]
    )
    assert rc == 0
    m = read_manifest(out)
    assert isinstance(m, ModelManifest)
    assert m.backbone.name == WRN50 and m.patchcore.feature_dim == 1536
    assert m.preprocessing.mean == (0.485, 0.456, 0.406)
    loo = load_scoreset(out / "scores" / "normal_loo.json")
    assert all(i.startswith("sub/") for i in loo.item_ids)


def test_projection_is_stored_and_applied(small_category: Path, tmp_path: Path) -> None:
    """--projection-dim stores projection.npy [152, 48]; the bank and scoring use 48 dims."""
    from ngcal.patchcore.io import load_model, score_paths

    out = tmp_path / "p"
    rc = main(
        [
            "fit",
            "--data",
            str(small_category),
            "--out",
            str(out),
            "--image-size",
            "64",
            "--projection-dim",
            "48",
            "--cv-folds",
            "0",
            "--max-images",
            "6",
            "--quiet",
        ]
    )
    assert rc == 0
    assert np.load(out / "projection.npy").shape == (152, 48)
    loaded = load_model(out)
    assert loaded.manifest.patchcore.feature_dim == 48
    assert loaded.manifest.patchcore.raw_feature_dim == 152
    assert tuple(loaded.module.memory_bank.shape)[1] == 48
    good = next((small_category / "test" / "good").iterdir())
    assert np.isfinite(score_paths(loaded, [good], with_maps=False).scores).all()


def test_extraction_batch_defaults_by_device_and_refuses_nonsense() -> None:
    """Extraction batch: 4 on CPU (measured fastest per image), 32 on GPU, or as given; < 1
    is refused before any work, naming the field."""
    from ngcal.core.errors import ConfigError
    from ngcal.patchcore.fitting import FitConfig

    assert FitConfig().extraction_batch == 4
    assert FitConfig(device="cuda").extraction_batch == 32
    assert FitConfig(batch_size=7).extraction_batch == 7
    with pytest.raises(ConfigError, match="batch size 0"):
        FitConfig(batch_size=0)
