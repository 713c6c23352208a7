"""Predict: every model kind, bad inputs one by one, refer flags, Grad-CAM, both output formats."""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest

from conftest import TINY_EXPORT_TEMPERATURE as TEMPERATURE
from conftest import TINY_EXPORT_THRESHOLD as THRESHOLD
from conftest import run_command
from shared_runs import shared_result

SIZE = 32


@pytest.fixture(scope="module")
def exported_run(tiny_export):
    """The calibrated tiny run exported to SavedModel and TFLite (conftest's :func:`tiny_export`,
    calibrated at TEMPERATURE and THRESHOLD): read-only, copy it to write."""
    return tiny_export[0]


def phantom(h: int, w: int, label: int = 1, seed: int = 0) -> np.ndarray:
    from pneumo_tf.data import phantoms

    return phantoms.generate_phantom(np.random.default_rng(seed), label, (h, w))[0]


def write_dicom(path: Path, pixels: np.ndarray | None) -> Path:
    """A minimal CR DICOM file (12-bit pixels in 16-bit words), or one without PixelData."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "CR"
    ds.PatientID = "phantom"
    if pixels is not None:
        ds.Rows, ds.Columns = pixels.shape
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 12, 11
        ds.PixelRepresentation = 0
        ds.PixelData = (pixels.astype(np.uint16) * 16).tobytes()
    ds.save_as(path, enforce_file_format=True)
    return path


def huge_png_header(width: int = 12000, height: int = 12000) -> bytes:
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
            + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def good_files(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("good")
    a = root / "a_normal.jpeg"
    cv2.imwrite(str(a), phantom(300, 380, 0, 1))
    b = root / "sub" / "b_pneumonia.png"
    b.parent.mkdir()
    cv2.imwrite(str(b), phantom(420, 520, 1, 2))
    c = write_dicom(root / "c.dcm", phantom(256, 300, 1, 3))
    return [a, b, c]


# ---------------------------------------------------------------------------------------------
# Inputs


def test_bad_inputs_give_an_error_line_each_and_the_rest_are_predicted(exported_run, good_files,
                                                                        tmp_path):
    from pneumo_tf.serving import predictor as predict

    jpeg = cv2.imencode(".jpg", phantom(300, 380))[1].tobytes()
    bad = {
        "missing.png": None,
        "notes.png": b"this is not an image at all\n" * 10,
        "truncated.jpeg": jpeg[:len(jpeg) // 2],
        "empty.jpeg": b"",
        "huge.png": huge_png_header(),
    }
    paths = []
    for name, data in bad.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        paths.append(path)
    no_pixels = write_dicom(tmp_path / "no_pixels.dcm", None)
    empty_dir = tmp_path / "empty_dir"
    empty_dir.mkdir()
    inputs = [good_files[0], *paths, no_pixels, good_files[2], empty_dir, good_files[1]]
    predictor = predict.load_predictor(exported_run)
    out = list(predict.predict_paths(predictor, inputs, batch_size=3))
    assert [r["path"] for r in out] == [str(p) for p in inputs]
    expected_errors = {"missing.png": "no such file", "notes.png": "not an image",
                       "truncated.jpeg": "truncated", "empty.jpeg": "empty file",
                       "huge.png": "exceeds the limit", "no_pixels.dcm": "without pixel data",
                       "empty_dir": "folder has no"}
    for rec in out:
        name = Path(rec["path"]).name
        if name in expected_errors:
            assert set(rec) == {"path", "error"}, rec
            assert expected_errors[name] in rec["error"], rec
        else:
            assert "error" not in rec
            assert 0.0 <= rec["probability"] <= 1.0
            assert rec["label"] in (0, 1) and rec["class_name"] in ("NORMAL", "PNEUMONIA")
    assert sum("error" in r for r in out) == len(expected_errors)


def test_folders_are_searched_recursively_for_images(good_files, tmp_path):
    from pneumo_tf.serving import predictor as predict

    folder = good_files[0].parent
    (folder / "readme.txt").write_text("not an image")
    items = predict.expand_inputs([folder])
    assert [Path(i.path).name for i in items] == ["a_normal.jpeg", "c.dcm", "b_pneumonia.png"]
    assert all(i.error is None for i in items)


# ---------------------------------------------------------------------------------------------
# Model kinds


def test_every_model_kind_gives_the_same_answer(exported_run, good_files):
    from pneumo_tf.serving import predictor as predict

    kinds = {exported_run: ("run_dir", 1e-6),
             exported_run / "model.keras": ("keras", 1e-6),
             exported_run / "export" / "saved_model": ("saved_model", 1e-5),
             exported_run / "export" / "model_fp16.tflite": ("tflite", 0.01),
             exported_run / "export" / "model_int8.tflite": ("tflite", 0.1)}
    reference = None
    for path, (kind, tol) in kinds.items():
        predictor = predict.load_predictor(path)
        assert predictor.kind == kind
        assert predictor.config.image_size == SIZE and predictor.config.calibrated
        assert predictor.config.temperature == pytest.approx(TEMPERATURE)
        out = list(predict.predict_paths(predictor, good_files))
        probs = np.array([r["probability"] for r in out])
        if reference is None:
            reference = probs
        np.testing.assert_allclose(probs, reference, atol=tol, err_msg=str(path))
        for rec in out:
            p = rec["probability"]
            cal = 1 / (1 + np.exp(-np.log(p / (1 - p)) / TEMPERATURE))
            assert rec["calibrated_probability"] == pytest.approx(cal, abs=1e-9)
            assert rec["label"] == int(p >= THRESHOLD)


def test_predict_uses_the_converter_pixels(exported_run, good_files):
    """The image fed to the model is decode_bytes + preprocess_gray, as in the TFRecords."""
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.image import preprocess
    from pneumo_tf.data import decode

    for path in good_files:
        item = predict.read_input(str(path), SIZE, "fixed")
        decoded = decode.decode_bytes(path.read_bytes(), name=path.name, target_size=SIZE,
                                      crop="fixed")
        np.testing.assert_array_equal(item.image,
                                      preprocess.preprocess_gray(decoded.gray, SIZE, "fixed")[0])


@pytest.mark.parametrize("case, match", [
    ("missing", "no such file"), ("empty_dir", "without model.keras or saved_model.pb"),
    ("txt", "unknown model file"), ("lonely_keras", "no data_manifest.json beside it"),
    ("lonely_tflite", "pneumo_tf_serving.json is missing")])
def test_unusable_model_paths_are_named(exported_run, tmp_path, case, match):
    from pneumo_tf.serving import predictor as predict

    path = tmp_path / case
    if case == "empty_dir":
        path.mkdir()
    elif case == "txt":
        path = tmp_path / "model.txt"
        path.write_text("x")
    elif case == "lonely_keras":
        path = tmp_path / "model.keras"
        shutil.copyfile(exported_run / "model.keras", path)
    elif case == "lonely_tflite":
        path = tmp_path / "model.tflite"
        shutil.copyfile(exported_run / "export" / "model_fp16.tflite", path)
    with pytest.raises(predict.PredictError, match=match):
        predict.load_predictor(path)


def test_keras_models_load_in_safe_mode(exported_run, tmp_path):
    """A .keras file with a Python lambda (arbitrary code) is refused, not executed."""
    import keras

    from pneumo_tf.serving import predictor as predict

    inputs = keras.Input((SIZE, SIZE, 1))
    outputs = keras.layers.Lambda(lambda x: x[:, :1, 0, 0])(inputs)
    run = tmp_path / "evil_run"
    run.mkdir()
    keras.Model(inputs, outputs).save(run / "model.keras")
    shutil.copyfile(exported_run / "data_manifest.json", run / "data_manifest.json")
    with pytest.raises(ValueError, match="safe_mode"):
        predict.load_predictor(run)


# ---------------------------------------------------------------------------------------------
# Refer flags


def test_refer_band_around_the_calibrated_threshold():
    from pneumo_tf.evaluation import calibration
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.serving import runtime as serving

    cfg = serving.ServingConfig(SIZE, "fixed", temperature=2.0, threshold=0.8, calibrated=True)
    at_threshold = predict.result_record("x", 0.8, cfg, [], 0.1)
    assert at_threshold["refer"] and at_threshold["refer_reasons"] == ["uncertain"]
    assert at_threshold["label"] == 1
    t_cal = cfg.calibrated_threshold()
    # A raw probability whose calibrated value is 0.15 below the calibrated threshold.
    p = float(calibration.apply_temperature(np.float64(t_cal - 0.15), 0.5))
    far = predict.result_record("x", p, cfg, [], 0.1)
    assert far["calibrated_probability"] == pytest.approx(t_cal - 0.15)
    assert not far["refer"] and far["label"] == 0
    assert predict.result_record("x", p, cfg, ["blank"], 0.1)["refer_reasons"] == ["blank"]


def test_the_refer_band_is_the_models_unless_given(exported_run, good_files):
    """predict's default band is the serving config's (an export's baked-in one)."""
    from pneumo_tf.serving import predictor as predict

    predictor = predict.load_predictor(exported_run / "export" / "saved_model")
    predictor.config.refer_band = 1.0  # as if exported with --refer_band=1
    assert all("uncertain" in r["refer_reasons"]
               for r in predict.predict_paths(predictor, good_files))
    assert not any("uncertain" in r["refer_reasons"]
                   for r in predict.predict_paths(predictor, good_files, refer_band=0.0))


def _probabilities_around(t: float, n_ulps: int = 40) -> list[float]:
    """``t``, its ``n_ulps`` float64 neighbours each side, widening steps and a 0..1 grid."""
    below, above = [t], [t]
    for _ in range(n_ulps):
        below.append(float(np.nextafter(below[-1], 0.0)))
        above.append(float(np.nextafter(above[-1], 1.0)))
    steps = [t + s * d for d in np.logspace(-15, -1, 29) for s in (-1, 1)]
    return [min(max(v, 0.0), 1.0) for v in below + above + steps + list(np.linspace(0, 1, 101))]


@pytest.mark.parametrize("temperature, threshold, applies_to", [
    (1.5, 0.5, "probability"), (2.0, 0.8, "probability"), (0.4, 0.3, "probability"),
    (1.7, 0.45, "calibrated_probability"), (3.0, 0.999, "probability"), (1.0, 0.62, "probability")])
def test_row_label_is_calibrated_probability_at_threshold(temperature, threshold, applies_to):
    """label == (calibrated_probability >= threshold) in every row, also at the threshold."""
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.serving import runtime as serving

    cfg = serving.ServingConfig(SIZE, "fixed", temperature=temperature, threshold=threshold,
                                threshold_applies_to=applies_to, calibrated=True)
    labels = set()
    for p in _probabilities_around(cfg.raw_threshold()):
        rec = json.loads(json.dumps(predict.result_record("x.png", p, cfg, [], 0.1)))
        assert isinstance(rec["label"], int)
        assert rec["label"] == int(rec["calibrated_probability"] >= rec["threshold"]), rec
        assert rec["class_name"] == ("PNEUMONIA" if rec["label"] else "NORMAL")
        assert rec["threshold"] == cfg.calibrated_threshold()
        labels.add(rec["label"])
    assert labels == {0, 1}


def test_the_clinicians_case_cannot_happen():
    """A calibrated probability above the calibrated threshold is never labelled NORMAL."""
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.serving import runtime as serving

    # Raw threshold 0.8 with T = 2: the same cut is 0.667 on the calibrated scale.
    cfg = serving.ServingConfig(SIZE, "fixed", temperature=2.0, threshold=0.8, calibrated=True)
    p = 1 / (1 + ((1 - 0.715) / 0.715) ** 2)  # calibrated probability 0.715
    rec = predict.result_record("x.png", p, cfg, [], 0.01)
    assert rec["calibrated_probability"] == pytest.approx(0.715)
    assert rec["threshold"] == pytest.approx(1 / (1 + 0.5))
    assert rec["label"] == 1 and rec["class_name"] == "PNEUMONIA"


def test_every_model_kind_reports_the_calibrated_threshold(exported_run, good_files):
    from pneumo_tf.evaluation import calibration
    from pneumo_tf.serving import predictor as predict

    expected = calibration.calibrated_threshold({"temperature": TEMPERATURE,
                                                 "threshold": THRESHOLD})
    for path in (exported_run, exported_run / "export" / "saved_model",
                 exported_run / "export" / "model_int8.tflite"):
        for rec in predict.predict_paths(predict.load_predictor(path), good_files):
            assert rec["threshold"] == expected
            assert rec["label"] == int(rec["calibrated_probability"] >= rec["threshold"])


# ---------------------------------------------------------------------------------------------
# Grad-CAM and output formats


def test_gradcam_overlays_for_keras_models_only(exported_run, good_files, tmp_path):
    from pneumo_tf.serving import predictor as predict

    out = list(predict.predict_paths(predict.load_predictor(exported_run), good_files,
                                     gradcam_dir=tmp_path / "cam"))
    written = sorted((tmp_path / "cam").glob("*.png"))
    assert [Path(r["gradcam"]) for r in out] == [tmp_path / "cam" / predict.gradcam_file_name(i, r["path"])
                                                 for i, r in enumerate(out)]
    assert len(written) == len(good_files)
    assert cv2.imread(str(written[0])).shape == (SIZE, SIZE, 3)
    tflite = predict.load_predictor(exported_run / "export" / "model_fp16.tflite")
    with pytest.raises(predict.PredictError, match="--gradcam_dir needs the Keras model"):
        list(predict.predict_paths(tflite, good_files, gradcam_dir=tmp_path / "cam2"))


def test_table_rows():
    from pneumo_tf.serving import predictor as predict

    ok = {"path": "a.png", "probability": 0.91234, "calibrated_probability": 0.8, "threshold": 0.57,
          "label": 1, "class_name": "PNEUMONIA", "refer": True, "refer_reasons": ["blank"],
          "in_distribution": False}
    row = predict.format_table_row(ok)
    assert row.split()[:6] == ["0.9123", "0.8000", "0.5700", "PNEUMONIA", "yes", "OUT"]
    assert row.endswith("(blank)")
    viral = dict(ok, subtype="VIRAL", refer=False, refer_reasons=[], in_distribution=True)
    assert predict.format_table_row(viral).split()[3:6] == ["VIRAL", "no", "in"]
    unguarded = dict(ok, in_distribution=None)
    assert predict.format_table_row(unguarded).split()[5] == "-"
    rejected = dict(ok, label=None, class_name=None, refer_reasons=["not_a_chest_film"])
    assert predict.format_table_row(rejected).split()[3:6] == ["-", "yes", "OUT"]
    err = predict.format_table_row({"path": "b.png", "error": "truncated JPEG"})
    assert "ERROR" in err and "b.png" in err and "truncated JPEG" in err
    assert predict.format_table_header().split() == ["probability", "calibrated", "threshold",
                                                     "label", "refer", "ood", "path"]


@pytest.mark.slow
def test_cli_jsonl_exit_status_and_table(exported_run, good_files, tmp_path):
    tflite = exported_run / "export" / "model_fp16.tflite"
    out = run_command("pneumo_tf.predict", f"--model={tflite}", str(good_files[0]),
                      str(tmp_path / "nope.png"))
    assert out.returncode == 1, out.stderr[-2000:]
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [Path(r["path"]).name for r in lines] == ["a_normal.jpeg", "nope.png"]
    assert "probability" in lines[0] and set(lines[1]) == {"path", "error"}
    assert "Traceback" not in out.stderr

    out = run_command("pneumo_tf.predict", f"--model={exported_run}", "--format=table",
                      str(good_files[0].parent))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = out.stdout.splitlines()
    assert rows[0].split() == ["probability", "calibrated", "threshold", "label", "refer", "ood",
                              "path"]
    assert len(rows) == 1 + len(good_files)

    out = run_command("pneumo_tf.predict", f"--model={tmp_path / 'no_model'}", str(good_files[0]))
    assert out.returncode != 0 and "--model=" in out.stderr and "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------
# Site calibrations (--calibration)

SITE_TEMPERATURE, SITE_THRESHOLD = 0.8, 0.3


@pytest.fixture(scope="module")
def site_run(exported_run, tmp_path_factory):
    """A copy of the exported run with a site calibration, exported with it baked in (built once
    for all xdist workers: read-only)."""
    def make(root):
        from pneumo_tf.serving import export

        run = Path(shutil.copytree(exported_run, root / "run"))
        (run / "calibrations").mkdir()
        (run / "calibrations" / "site_b.json").write_text(json.dumps({
            "name": "site_b", "temperature": SITE_TEMPERATURE, "threshold": SITE_THRESHOLD,
            "threshold_method": "val_youden", "threshold_applies_to": "probability",
            "source": "site", "split": "test"}))
        val_export = {p.name: p.read_bytes() for p in (run / "export").iterdir() if p.is_file()}
        export.export_run(run, ["saved_model", "tflite"], parity_count=8,
                          calibration_name="site_b")
        assert {p.name: p.read_bytes() for p in (run / "export").iterdir() if p.is_file()} \
            == val_export  # the val export stays as it is
        return run

    return shared_result(tmp_path_factory, "predictor_site_run", make)


def test_rows_name_the_calibration_val_by_default(exported_run, good_files):
    from pneumo_tf.serving import predictor as predict

    for path in (exported_run, exported_run / "export" / "saved_model",
                 exported_run / "export" / "model_fp16.tflite"):
        for rec in predict.predict_paths(predict.load_predictor(path), good_files):
            assert rec["calibration"] == "val", path
    # An old export whose serving config predates the key holds calibration.json: "val".
    config = json.loads((exported_run / "export" / "pneumo_tf_serving.json").read_text())
    assert config["calibration"] == "val"


def test_a_run_dir_applies_any_of_its_calibrations(site_run, good_files):
    from pneumo_tf.evaluation import calibration
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.core import rundir

    by_name = {name: list(predict.predict_paths(predict.load_predictor(site_run, name),
                                                good_files))
               for name in ("val", "site_b")}
    site_cut = calibration.calibrated_threshold({"temperature": SITE_TEMPERATURE,
                                                 "threshold": SITE_THRESHOLD})
    for val_rec, rec in zip(by_name["val"], by_name["site_b"]):
        assert rec["calibration"] == "site_b" and val_rec["calibration"] == "val"
        assert rec["probability"] == val_rec["probability"]
        assert rec["calibrated_probability"] == pytest.approx(
            calibration.apply_temperature(rec["probability"], SITE_TEMPERATURE))
        assert rec["threshold"] == site_cut
        assert rec["label"] == int(rec["probability"] >= SITE_THRESHOLD)
    with pytest.raises(rundir.RunDirError, match=r"--calibration=site_c: .*this run has: val, "
                                                 r"site_b"):
        predict.load_predictor(site_run, "site_c")


def test_export_bakes_the_site_calibration_and_predict_reports_it(site_run, good_files):
    import tensorflow as tf

    from pneumo_tf.evaluation import calibration
    from pneumo_tf.serving import predictor as predict

    out = site_run / "export_site_b"
    config = json.loads((out / "pneumo_tf_serving.json").read_text())
    assert config["calibration"] == "site_b" and config["temperature"] == SITE_TEMPERATURE
    assert json.loads((out / "parity.json").read_text())["calibration"] == "site_b"
    site_cut = calibration.calibrated_threshold({"temperature": SITE_TEMPERATURE,
                                                 "threshold": SITE_THRESHOLD})
    images = np.stack([predict.read_input(str(f), SIZE, "fixed").image for f in good_files])
    outputs = tf.saved_model.load(str(out / "saved_model")).signatures["preprocessed"](
        image=tf.constant(images[..., None]))
    p = outputs["probability"].numpy()
    np.testing.assert_allclose(outputs["calibrated_probability"].numpy(),
                               calibration.apply_temperature(p, SITE_TEMPERATURE), atol=1e-6)
    np.testing.assert_allclose(outputs["threshold"].numpy(), site_cut, atol=1e-7)
    reference = [r["probability"] for r in predict.predict_paths(
        predict.load_predictor(site_run, "site_b"), good_files)]
    for path in (out / "saved_model", out / "model_fp16.tflite"):
        predictor = predict.load_predictor(path)  # the baked calibration, no flag needed
        assert predictor.config.calibration == "site_b"
        recs = list(predict.predict_paths(predictor, good_files))
        assert [r["calibration"] for r in recs] == ["site_b"] * len(good_files)
        np.testing.assert_allclose([r["probability"] for r in recs], reference, atol=0.01)
        assert all(r["threshold"] == site_cut for r in recs)
        assert predict.load_predictor(path, "site_b").config.calibration == "site_b"
        with pytest.raises(predict.PredictError, match=r"--calibration=val: .*'site_b' baked in"):
            predict.load_predictor(path, "val")


@pytest.mark.slow
def test_cli_calibration_flag(site_run, good_files):
    base = ["pneumo_tf.predict", str(good_files[0])]
    out = run_command(*base, f"--model={site_run}", "--calibration=site_b")
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.splitlines()[0])["calibration"] == "site_b"
    out = run_command(*base, f"--model={site_run / 'export_site_b' / 'saved_model'}")
    assert out.returncode == 0 and json.loads(out.stdout)["calibration"] == "site_b"
    out = run_command(*base, f"--model={site_run / 'export_site_b' / 'saved_model'}",
                      "--calibration=val")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "pneumo_tf.predict: error: --calibration=val" in out.stderr


# ---------------------------------------------------------------------------------------------
# The OOD guard and the subtype fields


OOD_KINDS = {"run_dir": (1e-9, 1.0), "saved_model": (1e-4, 1.0), "tflite": (0.05, 0.9)}


@pytest.fixture(scope="module")
def ood_inputs(phantom_ood_run, tmp_path_factory):
    """``{kind: [files]}``: photos, inverted and sideways phantom films, ordinary phantom films."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("ood_inputs")
    files = {"photo": [], "inverted": [], "sideways": [], "film": []}
    for i, rgb in enumerate(load_sample_images().images):
        path = root / f"photo_{i}.jpeg"
        cv2.imwrite(str(path), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
        files["photo"].append(path)
    for i in range(12):
        film = phantom(*(300 + 17 * i, 380 + 11 * i), label=i % 2, seed=100 + i)
        for kind, image in (("film", film), ("inverted", 255 - film), ("sideways", np.rot90(film))):
            if kind != "film" and i >= 4:
                continue
            path = root / f"{kind}_{i}.png"
            cv2.imwrite(str(path), np.ascontiguousarray(image))
            files[kind].append(path)
    return files


def test_rows_say_whether_the_image_is_a_chest_film(phantom_ood_export, ood_inputs):
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.serving import refer

    predictor = predict.load_predictor(phantom_ood_export["run_dir"])
    rows = {kind: list(predict.predict_paths(predictor, paths))
            for kind, paths in ood_inputs.items()}
    for rec in (r for kind_rows in rows.values() for r in kind_rows):
        back = json.loads(json.dumps(rec))
        assert isinstance(back["ood_score"], float) and isinstance(back["in_distribution"], bool)
        assert back["in_distribution"] == (not set(back["refer_reasons"]) & {
            refer.NOT_A_CHEST_FILM, "inverted", "on_its_side"})
        assert "subtype" not in back  # a binary run
        # No diagnosis for what the guard rejects; the probabilities stay, for audit.
        diagnosed = back["in_distribution"]
        assert (back["label"] is None) == (back["class_name"] is None) == (not diagnosed), back
        assert back["refer"] or diagnosed
        assert 0.0 <= back["probability"] <= 1.0
    assert all(r["refer_reasons"] == [refer.NOT_A_CHEST_FILM] for r in rows["photo"])
    assert all("inverted" in r["refer_reasons"] and not r["in_distribution"]
               for r in rows["inverted"])
    assert all("on_its_side" in r["refer_reasons"] for r in rows["sideways"])
    assert np.mean([r["in_distribution"] for r in rows["film"]]) >= 0.8
    line = json.dumps(rows["photo"][0])
    assert '"in_distribution": false' in line and '"ood_score": ' in line


def test_every_model_kind_carries_the_guard(phantom_ood_export, ood_inputs):
    from pneumo_tf.serving import predictor as predict

    paths = [p for kind_paths in ood_inputs.values() for p in kind_paths]
    reference = None
    for kind, (rtol, agreement) in OOD_KINDS.items():
        predictor = predict.load_predictor(phantom_ood_export[kind])
        assert predictor.ood_info is not None and predictor.ood_info["layer"] == "gap"
        rows = list(predict.predict_paths(predictor, paths))
        scores = np.array([r["ood_score"] for r in rows])
        verdicts = np.array([r["in_distribution"] for r in rows])
        if reference is None:
            reference = scores, verdicts
        np.testing.assert_allclose(scores, reference[0], rtol=rtol, err_msg=kind)
        assert np.mean(verdicts == reference[1]) >= agreement, kind


def test_ood_rates_count_what_predict_flags(phantom_ood_export, ood_inputs):
    from pneumo_tf.serving import predictor as predict

    predictor = predict.load_predictor(phantom_ood_export["run_dir"])
    films = [cv2.imread(str(p), cv2.IMREAD_GRAYSCALE) for p in ood_inputs["film"]]
    rates = predict.ood_rates(predictor, [255 - f for f in films])
    assert rates["n"] == len(films) and rates["flagged"] == 1.0
    assert rates["flagged_by_image_checks"] == 1.0
    assert predict.ood_rates(predictor, films)["flagged"] <= 0.2


def test_runs_without_a_guard_still_predict_with_null_fields(exported_run, good_files):
    """Run dirs and exports made before ood.json existed: the fields are there, null."""
    from pneumo_tf.serving import predictor as predict

    assert not (exported_run / "ood.json").exists()
    for path in (exported_run, exported_run / "export" / "saved_model",
                 exported_run / "export" / "model_fp16.tflite"):
        predictor = predict.load_predictor(path)
        assert predictor.ood_info is None
        for rec in predict.predict_paths(predictor, good_files):
            assert rec["ood_score"] is None and rec["in_distribution"] is None, path
            assert '"in_distribution": null' in json.dumps(rec)
    with pytest.raises(predict.PredictError, match="no OOD guard"):
        predict.ood_rates(predict.load_predictor(exported_run), [phantom(300, 380)])


def test_subtype_rows_name_the_subtype_of_every_model_kind(subtype_export, tmp_path):
    """Every model kind names the subtype of the rows it diagnoses. The tiny run's guard rejects
    every phantom (a run trained on noise squares), and a rejected row has no diagnosis, so no
    subtype either; the subtypes are then read with the guard's threshold set aside."""
    import dataclasses

    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.data import phantoms

    rng = np.random.default_rng(4)
    paths = []
    for i in range(8):
        path = tmp_path / f"f{i}.png"
        cv2.imwrite(str(path), phantoms.generate_phantom(rng, i % 2, (120, 140))[0])
        paths.append(path)
    reference = None
    run = subtype_export[0]
    for model, tol in ((run, 1e-6), (run / "export" / "saved_model", 1e-5),
                       (run / "export" / "model_fp16.tflite", 0.01)):
        predictor = predict.load_predictor(model)
        assert predictor.config.task == "subtype"
        for rec in predict.predict_paths(predictor, paths):
            assert rec["in_distribution"] is False and rec["refer"]
            assert rec["label"] is None and rec["subtype"] is None, rec
        predictor.config = dataclasses.replace(predictor.config, ood=None)  # no guard
        rows = [json.loads(json.dumps(r)) for r in predict.predict_paths(predictor, paths)]
        for rec in rows:
            if rec["label"] == 0:
                assert rec["subtype"] is None and rec["subtype_probability"] is None
            else:
                assert rec["subtype"] in ("BACTERIAL", "VIRAL")
                assert 0.5 <= rec["subtype_probability"] <= 1.0
        probs = np.array([[r["probability"], r["subtype_probability"] or 0] for r in rows])
        if reference is None:
            reference = probs, [r["subtype"] for r in rows]
        np.testing.assert_allclose(probs, reference[0], atol=tol, err_msg=str(model))
        assert [r["subtype"] for r in rows] == reference[1], model


# ---------------------------------------------------------------------------------------------
# The lung model: lung_fraction, lung_confidence, no_lungs_found, the lung crop


@pytest.fixture(scope="module")
def guarded_lung_run(tmp_path_factory):
    """``(lungs run, phantom source)``: a lung model trained a little longer (64 px, 14 epochs on
    240 phantoms, ~1 min) so its films' maps are crisp, with its guard fitted on val.

    What such a model, trained only on films, does with anything else (measured while writing
    this test on 8 models of this kind, seeds 0-4): it finds "lungs" in photos, pages and noise
    too, up to 0.6 of the image, so the lung share alone refers few of them; but its maps of
    them are blurred. Its guard (the val films' 1 % quantile of the lung confidence) sat 0.02 or
    more above every page (at most 0.93), noise image (0.89) and the flower photo (0.94) for
    the model's own guard: those are referred reliably, and the phantom test films (drawn like
    the val films) pass it. The other sample photo, a pagoda, came within 0.001 of the guard
    once (0.962 vs 0.9624): not a reliable no_lungs_found, only a reliable referral (the
    classifier's OOD guard flags it).
    """
    from support_runs import make_lung_run

    return make_lung_run(tmp_path_factory.mktemp("guarded_lungs"), image_size=64, epochs=14,
                         num_train=240, unet=(8, 4))


def _text_page(rng: np.random.Generator, background: int) -> np.ndarray:
    page = np.full((640, 480), background, np.uint8)
    for row in range(40, 620, 26):
        words = " ".join("".join(chr(int(c)) for c in rng.integers(97, 123, rng.integers(2, 9)))
                         for _ in range(5))
        cv2.putText(page, words, (20, row), cv2.FONT_HERSHEY_SIMPLEX, 0.6, 20, 1, cv2.LINE_AA)
    return page


@pytest.fixture(scope="module")
def not_films(tmp_path_factory) -> dict[str, list[Path]]:
    """Photos (scikit-learn's two), pages of text and noise, as files."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("not_films")
    rng = np.random.default_rng(0)
    images = {"photo": [cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in load_sample_images().images],
              "text": [_text_page(rng, 235), _text_page(rng, 255)],
              "noise": [rng.integers(0, 256, (512, 512), dtype=np.uint8),
                        np.clip(rng.normal(128, 50, (400, 500)), 0, 255).astype(np.uint8)]}
    files = {}
    for kind, grays in images.items():
        files[kind] = []
        for i, gray in enumerate(grays):
            path = root / f"{kind}_{i}.png"
            cv2.imwrite(str(path), gray)
            files[kind].append(path)
    return files


def test_photos_pages_and_noise_are_referred_no_lungs_found(phantom_ood_run, guarded_lung_run,
                                                           not_films):
    from pneumo_tf.serving import lungs as lung_serving
    from pneumo_tf.serving import predictor as predict
    from pneumo_tf.serving import refer

    run, _, _ = phantom_ood_run
    lung_run, src = guarded_lung_run
    predictor = predict.load_predictor(run, lungs=lung_serving.LungOptions(str(lung_run)))
    assert predictor.lungs.settings.confidence_source == "lung_guard.json"
    reliable = [*not_films["photo"][1:], *not_films["text"], *not_films["noise"]]  # see above
    for rec in predict.predict_paths(predictor, reliable):
        assert refer.NO_LUNGS_FOUND in rec["refer_reasons"] and rec["refer"], rec
        assert 0.0 <= rec["lung_fraction"] <= 1.0 and 0.0 <= rec["lung_confidence"] <= 1.0
    films = sorted((src / "test").rglob("*.jpeg"))
    rows = list(predict.predict_paths(predictor, films))
    found = [refer.NO_LUNGS_FOUND not in r["refer_reasons"] for r in rows]
    assert np.mean(found) >= 0.8, [(r["lung_fraction"], r["lung_confidence"]) for r in rows]
    assert all(0.1 < r["lung_fraction"] < 0.6 for r in rows)
    # Beside the OOD guard, not instead of it: the photos are out of the classifier's
    # distribution too, and the pagoda is referred whatever its lung confidence.
    for photo in predict.predict_paths(predictor, not_films["photo"]):
        assert "not_a_chest_film" in photo["refer_reasons"] and photo["refer"]
    flower = next(predict.predict_paths(predictor, not_films["photo"][1:]))
    assert {"not_a_chest_film", refer.NO_LUNGS_FOUND} <= set(flower["refer_reasons"])
    plain = next(predict.predict_paths(predict.load_predictor(run), films[:1]))
    assert plain["lung_fraction"] is None and plain["lung_confidence"] is None


def test_every_model_kind_of_a_lung_crop_run_crops_and_measures_the_lungs(lung_crop_export,
                                                                         lung_run, monkeypatch):
    import tensorflow as tf

    from pneumo_tf.core import rundir
    from pneumo_tf.serving import predictor as predict

    # Each model is loaded once: the run dir's classifier and its lung model (two .keras
    # files), the SavedModel once for both of its signatures, nothing for TFLite.
    loads = []
    keras_load, saved_model_load = rundir._load_keras_model, tf.saved_model.load
    monkeypatch.setattr(rundir, "_load_keras_model",
                        lambda path: loads.append(("keras", path.parent)) or keras_load(path))
    monkeypatch.setattr(tf.saved_model, "load", lambda path, *args, **kwargs: loads.append(
        ("saved_model", Path(path))) or saved_model_load(path, *args, **kwargs))
    run, _ = lung_crop_export
    files = sorted((lung_run[1] / "test").rglob("*.jpeg"))
    reference = None
    expected_loads = {run: [("keras", run), ("keras", lung_run[0])],
                      run / "export" / "saved_model": [("saved_model",
                                                        run / "export" / "saved_model")],
                      run / "export" / "model_fp16.tflite": []}
    for model, tol in ((run, 0.0), (run / "export" / "saved_model", 1e-5),
                       (run / "export" / "model_fp16.tflite", 0.02)):
        loads.clear()
        predictor = predict.load_predictor(model)
        assert predictor.lungs is not None and predictor.config.crop == "lungs", model
        rows = [json.loads(json.dumps(r)) for r in predict.predict_paths(predictor, files)]
        assert sorted(loads) == sorted(expected_loads[model]), model
        got = np.array([[r["probability"], r["lung_fraction"], r["lung_confidence"]]
                        for r in rows])
        if reference is None:
            reference = got
        np.testing.assert_allclose(got, reference, atol=tol + 1e-6, err_msg=str(model))


def test_lung_model_mistakes_are_named(lung_crop_export, lung_run, exported_run, good_files):
    from pneumo_tf.core import rundir
    from pneumo_tf.serving import lungs as lung_serving
    from pneumo_tf.serving import predictor as predict

    run, _ = lung_crop_export
    saved = run / "export" / "saved_model"
    with pytest.raises(predict.PredictError, match=r"exported with the lung model .* baked in"):
        predict.load_predictor(saved, lungs=lung_serving.LungOptions(str(lung_run[0])))
    with pytest.raises(predict.PredictError, match=r"is a lung model .*--lung_model="):
        predict.load_predictor(lung_run[0])
    with pytest.raises(rundir.RunDirError, match=r"not a lung model"):
        predict.load_predictor(run,
                               lungs=lung_serving.LungOptions(str(exported_run)))
    # An export without a lung model takes one on the host.
    predictor = predict.load_predictor(exported_run / "export" / "saved_model",
                                       lungs=lung_serving.LungOptions(str(lung_run[0]),
                                                                      min_lung_fraction=0.0))
    rec = next(predict.predict_paths(predictor, good_files[:1]))
    assert rec["lung_fraction"] > 0 and predictor.lungs.kind == "keras"


@pytest.mark.slow
def test_predict_cli_takes_a_lung_model(exported_run, lung_run, good_files, tmp_path):
    base = ["pneumo_tf.predict", f"--model={exported_run}"]
    out = run_command(*base, f"--lung_model={lung_run[0]}", "--min_lung_confidence=0",
                      str(good_files[0]))
    assert out.returncode == 0, out.stderr[-2000:]
    rec = json.loads(out.stdout)
    assert 0 < rec["lung_fraction"] < 1 and rec["lung_confidence"] > 0
    bad = run_command(*base, f"--lung_model={tmp_path / 'none'}", str(good_files[0]))
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "pneumo_tf.predict: error: --lung_model=")
