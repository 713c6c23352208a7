"""Export: calibration handling, SavedModel signatures, training/serving skew, TFLite parity."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from conftest import TINY_EXPORT_TEMPERATURE as TEMPERATURE
from conftest import TINY_EXPORT_THRESHOLD as THRESHOLD
from conftest import run_command, write_calibration

SIZE = 32


@pytest.fixture(scope="module")
def run_and_data(tiny_run, tmp_path_factory):
    """A copy of the tiny run (32 px, fixed crop), and its data dir."""
    run, data = tiny_run
    return Path(shutil.copytree(run, tmp_path_factory.mktemp("export") / "run")), data


@pytest.fixture(scope="module")
def exported(tiny_export):
    """``(run, data, report)``: the calibrated tiny run exported in both formats (conftest's
    :func:`tiny_export`, shared with the predict tests): read-only."""
    return tiny_export


def phantom_files(out: Path, sizes=((300, 380), (520, 640), (900, 1200), (1100, 820))) -> dict:
    """Encoded phantom radiographs: gray JPEG, gray PNG, RGB JPEG, RGB PNG, 16-bit PNG and a gray
    JPEG stored on its side with EXIF orientation 6, per size."""
    from pneumo_tf.data import phantoms

    rng = np.random.default_rng(3)
    files = {}
    out.mkdir(parents=True, exist_ok=True)
    for i, (h, w) in enumerate(sizes):
        gray = phantoms.generate_phantom(rng, i % 2, (h, w))[0]
        rgb = np.stack([gray, np.clip(gray.astype(int) + 20, 0, 255).astype(np.uint8), gray // 2], -1)
        variants = {f"gray_{h}x{w}.jpeg": cv2.imencode(".jpg", gray)[1],
                    f"gray_{h}x{w}.png": cv2.imencode(".png", gray)[1],
                    f"rgb_{h}x{w}.jpeg": cv2.imencode(".jpg", rgb)[1],
                    f"rgb_{h}x{w}.png": cv2.imencode(".png", rgb)[1],
                    f"gray16_{h}x{w}.png": cv2.imencode(".png", gray.astype(np.uint16) * 200 + 900)[1]}
        for name, enc in variants.items():
            files[name] = enc.tobytes()
            (out / name).write_bytes(files[name])
        # Stored on its side with EXIF orientation 6 (display: turned 90 degrees clockwise), as
        # phones and some viewers save: upright once the orientation is applied.
        exif = Image.Exif()
        exif[0x0112] = 6
        buf = io.BytesIO()
        Image.fromarray(np.ascontiguousarray(np.rot90(gray, 1))).save(buf, "JPEG", exif=exif,
                                                                      quality=95)
        files[f"exif6_{h}x{w}.jpeg"] = buf.getvalue()
        (out / f"exif6_{h}x{w}.jpeg").write_bytes(buf.getvalue())
    return files


def host_preprocess(data: bytes, name: str, size: int, crop: str) -> np.ndarray:
    """The converter's path: decode_bytes (with its DCT reduction) + preprocess_gray."""
    from pneumo_tf.image import preprocess
    from pneumo_tf.data import decode

    decoded = decode.decode_bytes(data, name=name, target_size=size, crop=crop)
    return preprocess.preprocess_gray(decoded.gray, size, crop)[0]


# ---------------------------------------------------------------------------------------------
# Calibration


def test_export_refuses_without_calibration_or_data_dir(run_and_data, tmp_path):
    from pneumo_tf.serving import export

    run, _ = run_and_data
    bare = tmp_path / "bare_run"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("calibration.json", "export"))
    with pytest.raises(export.ExportError, match=r"calibration.json is missing.*--data_dir"):
        export.export_run(bare, ["tflite"])
    assert not (bare / "export").exists()


def test_missing_calibration_is_fitted_on_val_when_data_dir_given(run_and_data, tmp_path):
    from pneumo_tf.serving import export

    run, data = run_and_data
    bare = tmp_path / "bare_run"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("calibration.json", "export"))
    calibration = export.calibration_for_export(bare, data)
    written = json.loads((bare / "calibration.json").read_text())
    assert written["source"] == "val"
    assert calibration["temperature"] == pytest.approx(written["temperature"])
    assert calibration["temperature"] > 0 and 0 <= calibration["threshold"] <= 1


# ---------------------------------------------------------------------------------------------
# SavedModel


def test_saved_model_signatures_load_and_agree(exported, tmp_path):
    import tensorflow as tf

    from pneumo_tf.evaluation import calibration
    from pneumo_tf.serving import runtime as serving

    run, _, _ = exported
    sm_dir = run / "export" / "saved_model"
    loaded = tf.saved_model.load(str(sm_dir))
    assert set(loaded.signatures) == {"serving_default", "preprocessed", "preprocessed_float"}
    default = loaded.signatures["serving_default"]
    (spec,) = default.structured_input_signature[1].values()
    assert spec.dtype == tf.string and spec.shape.as_list() == [None]
    assert set(default.structured_outputs) == {"probability", "calibrated_probability",
                                               "threshold", "label", "refer", "refer_reasons",
                                               "refer_reason_flags"}

    files = phantom_files(tmp_path / "img", sizes=((300, 380), (700, 520)))
    names = sorted(files)
    out = default(images=tf.constant([files[n] for n in names]))
    p = out["probability"].numpy()
    assert p.shape == (len(names),) and np.all((p >= 0) & (p <= 1))
    np.testing.assert_allclose(out["calibrated_probability"].numpy(),
                               calibration.apply_temperature(p.astype(np.float64), TEMPERATURE),
                               atol=1e-5)
    np.testing.assert_array_equal(out["label"].numpy(), (p >= THRESHOLD).astype(np.int64))
    assert out["label"].dtype == tf.int64

    images = np.stack([host_preprocess(files[n], n, SIZE, "fixed") for n in names])[..., None]
    pre = loaded.signatures["preprocessed"](image=tf.constant(images))["probability"].numpy()
    pre_f = loaded.signatures["preprocessed_float"](
        image=tf.constant(images.astype(np.float32)))["probability"].numpy()
    np.testing.assert_allclose(pre, pre_f, atol=1e-6)
    config = json.loads((sm_dir / "assets.extra" / serving.SERVING_CONFIG_NAME).read_text())
    assert config["image_size"] == SIZE and config["crop"] == "fixed"
    assert config["temperature"] == pytest.approx(TEMPERATURE)


def _sweep_model(size: int, raw_threshold: float):
    """A Keras model whose probability crosses ``raw_threshold`` in sub-float32-ulp steps.

    ``logit = w0 * pixel0 + w1 * pixel1 + b``: pixel 1 moves the logit in coarse steps, pixel 0
    in steps smaller than the float32 spacing of the probability near the threshold.
    """
    import keras

    inputs = keras.Input((size, size, 1), dtype="uint8")
    x = keras.layers.Flatten()(keras.layers.Rescaling(1.0)(inputs))
    dense = keras.layers.Dense(1, activation="sigmoid")
    model = keras.Model(inputs, dense(x))
    kernel = np.zeros((size * size, 1), np.float32)
    kernel[0, 0], kernel[1, 0] = 2e-8, 1e-6
    logit = np.log(raw_threshold / (1 - raw_threshold))
    dense.set_weights([kernel, np.array([logit - 128 * 2e-8 - 128 * 1e-6], np.float32)])
    return model


def _sweep_images(size: int) -> np.ndarray:
    pixel0, pixel1 = np.meshgrid(np.arange(0, 256, 3), np.arange(118, 139))
    images = np.zeros((pixel0.size, size, size, 1), np.uint8)
    images[:, 0, 0, 0], images[:, 0, 1, 0] = pixel0.ravel(), pixel1.ravel()
    return images


@pytest.mark.parametrize("temperature, threshold, band", [(1.7, 0.45, 0.1), (0.6, 0.8, 0.0)])
def test_saved_model_label_is_calibrated_probability_at_threshold(tmp_path, temperature,
                                                                  threshold, band):
    """Every signature: label == (calibrated_probability >= threshold), also at the threshold;
    the bytes signature refers ``uncertain`` within the refer band baked in."""
    import tensorflow as tf

    from pneumo_tf.serving import export, refer
    from pneumo_tf.serving import runtime as serving

    size = 8
    cfg = serving.ServingConfig(size, "none", temperature=temperature, threshold=threshold,
                                calibrated=True, refer_band=band)
    export.export_saved_model(_sweep_model(size, threshold), cfg, tmp_path / "sm")
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    images = _sweep_images(size)
    png = [cv2.imencode(".png", image)[1].tobytes() for image in images[::7]]
    calls = {"preprocessed": {"image": tf.constant(images)},
             "preprocessed_float": {"image": tf.constant(images.astype(np.float32))},
             "serving_default": {"images": tf.constant(png)}}
    for name, kwargs in calls.items():
        out = {k: v.numpy() for k, v in loaded.signatures[name](**kwargs).items()}
        assert set(out["label"]) == {0, 1}, name
        assert out["threshold"].dtype == np.float32 and out["label"].dtype == np.int64
        np.testing.assert_array_equal(out["threshold"], np.float32(cfg.calibrated_threshold()))
        np.testing.assert_array_equal(
            out["label"], (out["calibrated_probability"] >= out["threshold"]).astype(np.int64),
            err_msg=name)
        # The sweep reaches the threshold within float32 rounding of it.
        gap = np.abs(out["calibrated_probability"] - out["threshold"])
        assert gap.min() <= np.spacing(out["threshold"][0]), name
    uncertain = out["refer_reason_flags"][:, refer.REFER_REASONS.index(refer.UNCERTAIN)]
    np.testing.assert_array_equal(uncertain, gap <= np.float32(band))
    assert uncertain.all() == (band > 0)  # the sweep stays within 0.1 of the threshold
    assert all(r.startswith(b"uncertain") == u for r, u in zip(out["refer_reasons"], uncertain))


def test_saved_model_cli_shows_the_signatures(exported):
    run, _, _ = exported
    cli = Path(sys.executable).parent / "saved_model_cli"
    out = subprocess.run([str(cli), "show", "--dir", str(run / "export" / "saved_model"), "--all"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    text = out.stdout
    for needle in ("signature_def['serving_default']", "signature_def['preprocessed']",
                   "DT_STRING", "probability", "calibrated_probability", "label", "DT_UINT8"):
        assert needle in text, needle


def test_training_serving_skew(exported, tmp_path):
    """In-graph decode+crop+resize vs the converter's pixels; probabilities within 1e-3.

    Documented tolerance (sources larger than the model input, i.e. downscaling): the decoded
    pixels are identical for 8-bit JPEG and PNG, gray or RGB (libjpeg's accurate DCT with the
    converter's DCT-reduction rule, libpng's RGB -> gray), within 1 grey level for 16-bit PNG;
    after the area resize (TF float vs OpenCV fixed point) at most 1 grey level, mean <= 0.02.
    """
    import tensorflow as tf

    from pneumo_tf.core import rundir
    from pneumo_tf.evaluation import scoring
    from pneumo_tf.data import decode

    run, _, _ = exported
    files = phantom_files(tmp_path / "img")
    names = sorted(files)
    model = rundir.load_model(run)
    for crop in ("fixed", "none"):
        for name in names:
            host_gray = decode.decode_bytes(files[name], name=name, target_size=SIZE, crop=crop).gray
            graph_gray = decode.tf_decode_gray(tf.constant(files[name]), SIZE, crop).numpy()[..., 0]
            assert host_gray.shape == graph_gray.shape, (crop, name)
            decode_diff = np.abs(host_gray.astype(int) - graph_gray.astype(int)).max()
            assert decode_diff <= (1 if name.startswith("gray16") else 0), (crop, name, decode_diff)
        host = np.stack([host_preprocess(files[n], n, SIZE, crop) for n in names])
        graph = np.stack([decode.tf_preprocess_bytes(tf.constant(files[n]), SIZE, crop).numpy()[..., 0]
                          for n in names])
        diff = np.abs(host.astype(int) - graph.astype(int))
        assert diff.max() <= 1 and diff.mean() <= 0.02, (crop, diff.max(), diff.mean())
    loaded = tf.saved_model.load(str(run / "export" / "saved_model"))
    served = loaded.signatures["serving_default"](
        images=tf.constant([files[n] for n in names]))["probability"].numpy()
    host = np.stack([host_preprocess(files[n], n, SIZE, "fixed") for n in names])[..., None]
    keras_p = scoring.make_predict_fn(model)(host).numpy()
    assert np.max(np.abs(served - keras_p)) < 1e-3


def test_signatures_are_traced_once_and_keep_their_weights(tmp_path):
    import keras
    import tensorflow as tf

    from pneumo_tf.serving import export, runtime

    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(2, activation="sigmoid")(inputs))
    model.layers[-1].set_weights([np.arange(8, dtype=np.float32).reshape(4, 2) / 10,
                                  np.array([0.5, -0.5], np.float32)])
    traces = []

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32, name="x")])
    def serve(x):
        traces.append(1)
        return {"probability": model(x)}

    x = np.array([[1, 2, 3, 4], [0, -1, 0, 1]], np.float32)
    expected = model(x).numpy()
    export.save_signatures({"serving_default": serve, "other": serve}, tmp_path / "sm")
    assert len(traces) == 1  # keras.export.ExportArchive traced it twice
    loaded = tf.saved_model.load(str(tmp_path / "sm"))
    assert set(loaded.signatures) == {"serving_default", "other"}
    np.testing.assert_allclose(loaded.signatures["other"](x=tf.constant(x))["probability"],
                               expected, atol=1e-6)
    # The TFLite converter freezes the weights (unfrozen, its model gave NaN).
    interpreter = runtime.tflite_interpreter(export.tflite_from_function(serve, "fp16"))
    got = interpreter.get_signature_runner("serving_default")(x=x)["probability"]
    np.testing.assert_allclose(got, expected, atol=1e-2)


def test_in_graph_jpeg_reduction_matches_the_converter_rule():
    import tensorflow as tf

    from pneumo_tf.data import decode

    for h, w in [(100, 100), (517, 640), (2000, 1500), (4000, 3000), (300, 2000)]:
        for size in (32, 224):
            for crop in ("fixed", "none", "adaptive", "lungs"):
                expected = decode.jpeg_reduction_factor(h, w, size, crop)
                got = int(decode.tf_jpeg_reduction_factor(tf.constant(h), tf.constant(w), size, crop))
                assert got == expected, (h, w, size, crop)


def test_adaptive_runs_refuse_a_bytes_saved_model(run_and_data, tmp_path):
    from pneumo_tf.serving import export

    run, _ = run_and_data
    adaptive = tmp_path / "adaptive_run"
    shutil.copytree(run, adaptive, ignore=shutil.ignore_patterns("export"))
    manifest = json.loads((adaptive / "data_manifest.json").read_text())
    (adaptive / "data_manifest.json").write_text(json.dumps({**manifest, "crop": "adaptive"}))
    write_calibration(adaptive)
    with pytest.raises(export.ExportError, match=r"--crop=adaptive.*--formats=tflite"):
        export.export_run(adaptive, ["saved_model"])


# ---------------------------------------------------------------------------------------------
# TFLite and parity


def test_parity_json_reports_every_variant_within_tolerance(exported):
    from pneumo_tf.serving import export

    run, data, report = exported
    on_disk = json.loads((run / "export" / "parity.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["passed"] is True
    assert report["batch"]["count"] == 12 and str(data) in report["batch"]["source"]
    for variant, name in export.TFLITE_VARIANTS.items():
        entry = report["variants"][variant]
        assert entry["bytes"] == (run / "export" / name).stat().st_size > 0
    assert report["variants"]["fp16"]["max_abs_prob_diff"] <= export.FP16_MAX_ABS_DIFF
    assert report["variants"]["int8"]["max_abs_prob_diff"] < 0.1
    assert report["variants"]["saved_model"]["max_abs_prob_diff"] < 1e-5
    # int8 weights are about half the float16 ones.
    assert report["variants"]["int8"]["bytes"] < report["variants"]["fp16"]["bytes"]


def test_tflite_runner_matches_keras_on_any_batch_size(exported):
    from pneumo_tf.serving import export
    from pneumo_tf.core import rundir
    from pneumo_tf.evaluation import scoring
    from pneumo_tf.serving import runtime as serving

    run, _, _ = exported
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 1), dtype=np.uint8)
    keras_p = scoring.make_predict_fn(rundir.load_model(run))(images).numpy()
    runner = serving.TFLiteRunner(run / "export" / "model_fp16.tflite")
    assert runner.image_size == SIZE
    np.testing.assert_allclose(runner.probabilities(images), keras_p, atol=export.FP16_MAX_ABS_DIFF)
    np.testing.assert_allclose(runner.probabilities(images[:2]), runner.probabilities(images)[:2],
                               atol=1e-6)


def test_fp16_parity_failure_is_an_error_and_recorded(run_and_data, tmp_path, monkeypatch):
    from pneumo_tf.serving import export

    run, data = run_and_data
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    write_calibration(copy)
    monkeypatch.setattr(export, "FP16_MAX_ABS_DIFF", -1.0)  # nothing can pass
    monkeypatch.setattr(export, "TFLITE_VARIANTS", {"fp16": "model_fp16.tflite"})
    with pytest.raises(export.ExportError, match=r"float16 TFLite.*parity.json"):
        export.export_run(copy, ["tflite"], data_dir=data, parity_count=4)
    assert json.loads((copy / "export" / "parity.json").read_text())["passed"] is False


def test_mixed_precision_model_is_rebuilt_in_float32_for_tflite():
    """A mixed_bfloat16 model with the training augmentation layer, as pneumo_tf.train builds it."""
    import keras

    from pneumo_tf.serving import export
    from pneumo_tf.modeling import model as pmodel
    from pneumo_tf.evaluation import scoring
    from pneumo_tf.serving import runtime as serving

    keras.utils.set_random_seed(0)
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    try:
        mixed = pmodel.build_model("small_cnn", SIZE, trainable_layers=-1, augment={"seed": 1})
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert export.is_mixed_precision(mixed)
    with pytest.raises(export.ExportError, match="mixed-precision"):
        export.convert_tflite(mixed, "fp16")
    f32 = export.float32_model(mixed)
    assert not export.is_mixed_precision(f32)
    assert export.float32_model(f32) is f32
    images = np.random.default_rng(1).integers(0, 256, (4, SIZE, SIZE, 1), dtype=np.uint8)
    p_mixed = scoring.make_predict_fn(mixed)(images).numpy()
    p_f32 = scoring.make_predict_fn(f32)(images).numpy()
    assert np.max(np.abs(p_mixed - p_f32)) < 0.02  # bf16 rounding only: same weights
    runner = serving.TFLiteRunner(export.convert_tflite(f32, "fp16"))
    assert np.max(np.abs(runner.probabilities(images) - p_f32)) <= export.FP16_MAX_ABS_DIFF


def test_unknown_format_is_named(run_and_data):
    from pneumo_tf.serving import export

    run, _ = run_and_data
    with pytest.raises(export.ExportError, match="onnx"):
        export.export_run(run, ["onnx"])


@pytest.mark.slow
def test_export_cli_reports_a_missing_calibration(run_and_data, tmp_path):
    run, _ = run_and_data
    bare = tmp_path / "bare"
    shutil.copytree(run, bare, ignore=shutil.ignore_patterns("calibration.json", "export"))
    out = run_command("pneumo_tf.export", f"--run_dir={bare}", "--formats=tflite")
    assert out.returncode != 0
    assert "calibration.json is missing" in out.stderr and "--data_dir" in out.stderr
    assert "Traceback" not in out.stderr


def test_parity_batch_uses_the_data_dir_of_flags_txt(run_and_data, tmp_path):
    from pneumo_tf.serving import export
    from pneumo_tf.serving import runtime as serving

    run, data = run_and_data
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    cfg = serving.serving_config_for_run(copy, None)
    images, source = export.parity_images(copy, cfg, count=4)
    assert "phantom" in source and images.shape == (4, SIZE, SIZE, 1)
    (copy / "flags.txt").write_text(f"# written by pneumo_tf.train\n--data_dir={data}\n--augment\n")
    images, source = export.parity_images(copy, cfg, count=4)
    assert source == f"val split of {data} (4 images)"
    assert images.shape == (4, SIZE, SIZE, 1) and images.dtype == np.uint8


def test_parity_label_agreement_uses_the_served_decision():
    from pneumo_tf.serving import export
    from pneumo_tf.serving import runtime as serving

    cfg = serving.ServingConfig(SIZE, "fixed", temperature=TEMPERATURE, threshold=THRESHOLD,
                                calibrated=True)
    # A hair below the threshold: 1e-12 survives the temperature's float64 arithmetic on every
    # CPU, where one ulp (np.nextafter) may round onto the threshold (numpy's tanh differs in
    # the last bit between its AVX2 and AVX-512 builds).
    below = THRESHOLD - 1e-12
    reference = np.array([0.1, THRESHOLD, 0.9, below])
    variant = np.array([0.1, below, 0.9, THRESHOLD])
    stats = export._diff_stats(variant, reference, cfg)
    assert stats["label_agreement"] == 0.5
    assert stats["max_abs_prob_diff"] == pytest.approx(1e-12, rel=1e-3)
    assert export._diff_stats(reference, reference, cfg)["label_agreement"] == 1.0


def test_export_of_a_calibration_the_run_lacks_is_refused(run_and_data, tmp_path):
    from pneumo_tf.serving import export
    from pneumo_tf.core import rundir

    run, data = run_and_data
    with pytest.raises(rundir.RunDirError, match=r"--calibration=site_b: .*site_b.json is missing"):
        export.export_run(run, ["tflite"], data_dir=data, calibration_name="site_b")
    assert not (run / "export_site_b").exists()
    with pytest.raises(ValueError, match="calibration name"):
        export.export_run(run, ["tflite"], data_dir=data, calibration_name="../x")


@pytest.mark.slow
def test_export_cli_bakes_the_named_calibration(run_and_data, tmp_path):
    run, data = run_and_data
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export*"))
    write_calibration(copy)
    (copy / "calibrations").mkdir()
    (copy / "calibrations" / "site_b.json").write_text(json.dumps({
        "temperature": 0.9, "threshold": 0.6, "threshold_method": "val_youden",
        "threshold_applies_to": "probability", "source": "site"}))
    done = run_command("pneumo_tf.export", f"--run_dir={copy}", f"--data_dir={data}",
                      "--formats=saved_model", "--parity_count=4", "--calibration=site_b")
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    assert lines[0] == f"exported with calibration site_b -> {copy / 'export_site_b'}"
    assert lines[1].split()[:2] == ["saved_model", "saved_model"] and "labels agree" in lines[1]
    assert lines[-1].endswith(f"passed; full report: {copy / 'export_site_b' / 'parity.json'}")
    assert json.loads((copy / "export_site_b" / "parity.json").read_text())["calibration"] == \
        "site_b"
    config = json.loads((copy / "export_site_b" / "pneumo_tf_serving.json").read_text())
    assert (config["calibration"], config["temperature"], config["threshold"]) == (
        "site_b", 0.9, 0.6)
    assert (copy / "export_site_b" / "saved_model" / "saved_model.pb").is_file()
    assert not (copy / "export").exists()


def test_export_command_prints_a_short_summary_of_the_parity_report():
    from pneumo_tf import export as export_command

    report = {"batch": {"source": "val split of D (32 images)", "count": 32},
              "calibration": "val", "passed": True,
              "variants": {
                  "keras_run_precision": {"max_abs_prob_diff": 0.002, "label_agreement": 1.0},
                  "saved_model": {"path": "saved_model", "bytes": 4_900_000,
                                  "max_abs_prob_diff": 2e-7, "label_agreement": 1.0,
                                  "in_distribution_agreement": 1.0},
                  "fp16": {"path": "model_fp16.tflite", "bytes": 2_480_000,
                           "max_abs_prob_diff": 0.0012, "label_agreement": 0.969},
                  "int8": {"path": "model_int8.tflite", "bytes": 1_480_000,
                           "max_abs_prob_diff": None, "non_finite": 3,
                           "label_agreement": None}}}
    lines = export_command.summary_lines(report, "runs/a/export")
    assert lines == [
        "exported with calibration val -> runs/a/export",
        "  keras_run_precision  the run's own precision            max |p - Keras| 2.0e-03, "
        "labels agree 1.000",
        "  saved_model          saved_model                4.9 MB  max |p - Keras| 2.0e-07, "
        "labels agree 1.000, in_distribution agrees 1.000",
        "  fp16                 model_fp16.tflite          2.5 MB  max |p - Keras| 1.2e-03, "
        "labels agree 0.969",
        "  int8                 model_int8.tflite          1.5 MB  max |p - Keras| n/a (3 "
        "non-finite)",
        "parity batch: val split of D (32 images); passed; full report: "
        "runs/a/export/parity.json"]


def test_exporting_an_unfinished_run_says_to_finish_training(run_and_data, tmp_path):
    from pneumo_tf.serving import export

    run, _ = run_and_data
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run, unfinished, ignore=shutil.ignore_patterns(
        "model.keras", "calibration.json", "export"))
    with pytest.raises(export.ExportError) as e:
        export.export_run(unfinished, ["tflite"])
    assert "has not finished training" in str(e.value) and "pneumo_tf.train" in str(e.value)
    assert "calibration.json" not in str(e.value)


# ---------------------------------------------------------------------------------------------
# The OOD guard and the subtype outputs


def _png(gray: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(gray))[1].tobytes()


def test_every_signature_of_a_subtype_run_adds_the_guard_and_the_subtype(subtype_export):
    import tensorflow as tf

    from pneumo_tf.serving import refer

    run, data, _ = subtype_export
    loaded = tf.saved_model.load(str(run / "export" / "saved_model"))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, SIZE, SIZE, 1), dtype=np.uint8)
    calls = {"serving_default": {"images": tf.constant([_png(im[..., 0]) for im in images])},
             "preprocessed": {"image": tf.constant(images)},
             "preprocessed_float": {"image": tf.constant(images.astype(np.float32))}}
    refer_outputs = {"refer": (np.bool_, (5,)), "refer_reasons": (np.object_, (5,)),
                     "refer_reason_flags": (np.bool_, (5, len(refer.REFER_REASONS)))}
    for name, kwargs in calls.items():
        out = {k: v.numpy() for k, v in loaded.signatures[name](**kwargs).items()}
        assert {k: (v.dtype, v.shape) for k, v in out.items()} == {
            "probability": (np.float32, (5,)), "calibrated_probability": (np.float32, (5,)),
            "threshold": (np.float32, (5,)), "label": (np.int64, (5,)),
            "ood_score": (np.float32, (5,)), "in_distribution": (np.bool_, (5,)),
            "class_probabilities": (np.float32, (5, 3)), "subtype": (np.int64, (5,)),
            "subtype_probability": (np.float32, (5,)),
            **(refer_outputs if name == "serving_default" else {})}, name
        np.testing.assert_allclose(out["probability"], 1 - out["class_probabilities"][:, 0],
                                   atol=1e-6)
        # No diagnosis (label -1) where the guard rejects the image; a subtype for PNEUMONIA only.
        np.testing.assert_array_equal(out["label"] == -1, ~out["in_distribution"])
        assert ((out["subtype"] == 0) == (out["label"] != 1)).all()
        assert (out["subtype_probability"] >= 0.5).all()
    config = json.loads((run / "export" / "pneumo_tf_serving.json").read_text())
    assert config["task"] == "subtype" and config["ood"]["threshold"] > 0
    assert config["subtype_temperature"] == json.loads(
        (run / "calibration.json").read_text())["subtype"]["temperature"]


def test_parity_covers_the_guard_and_the_subtype_outputs(subtype_export):
    from pneumo_tf.serving import runtime as serving

    run, _, report = subtype_export
    assert report["passed"] and report["outputs"] == {"ood": True, "subtype": True,
                                                      "lungs": False}
    sm, fp16, int8 = (report["variants"][k] for k in ("saved_model", "fp16", "int8"))
    assert sm["max_rel_ood_score_diff"] < 1e-4 and sm["max_abs_class_prob_diff"] < 1e-5
    assert sm["in_distribution_agreement"] == 1.0 and sm["subtype_agreement"] == 1.0
    # The quantised backbones move the features a little, and the score weighs them by the
    # precision: a real 128-px run's float16 scores are within 0.8 %, its int8 ones within 5 %
    # (BUILD.md); this run is barely trained and its features tiny, so its int8 scores move by
    # tens of percent: reported, not bounded here.
    assert fp16["max_rel_ood_score_diff"] < 0.05 and fp16["max_abs_class_prob_diff"] < 0.01
    assert np.isfinite(int8["max_rel_ood_score_diff"]) and "in_distribution_agreement" in int8
    runner = serving.TFLiteRunner(run / "export" / "model_fp16.tflite")
    assert set(runner.output_names) == {
        "probability", "calibrated_probability", "threshold", "label", "ood_score",
        "in_distribution", "class_probabilities", "subtype", "subtype_probability"}


@pytest.mark.slow
def test_the_guard_costs_the_tflite_model_little(subtype_run):
    """The guard's constants for its feature layer (small_cnn's 256-wide pooled features): a
    DxD whitening matrix and 2 whitened means, stored as float16 in the fp16 model and as float32 in the int8 one (see
    :func:`pneumo_tf.ood.tf_mahalanobis_scores`), and the upside-down probe's (two 16xS area
    matrices and 256 weights: :func:`pneumo_tf.ood.tf_upside_down`)."""
    from pneumo_tf.serving import export, ood
    from pneumo_tf.core import rundir
    from pneumo_tf.serving import runtime as serving

    run, _ = subtype_run
    stats = ood.load_stats(run)
    cfg = serving.serving_config_for_run(run, None)
    cfg.task = "subtype"
    model = rundir.load_model(run)
    variants = {"fp16": 2, "int8": 4}  # bytes per stored value
    guarded = export.convert_tflite_variants(model, list(variants), cfg, stats)
    unguarded = export.convert_tflite_variants(model, list(variants), cfg, None)
    for variant, bytes_per_value in variants.items():
        with_guard, without = len(guarded[variant]), len(unguarded[variant])
        constants = (stats.precision.size + stats.means.size
                     + 2 * ood.THUMB * cfg.image_size + ood.THUMB ** 2)
        assert 0 < with_guard - without < constants * bytes_per_value + 8192, variant


def test_the_bytes_signature_flags_photos_and_inverted_films(phantom_ood_export):
    """In-graph: the feature score and the two image checks of the decoded film."""
    import tensorflow as tf
    from sklearn.datasets import load_sample_images

    from pneumo_tf.data import phantoms

    signature = tf.saved_model.load(str(phantom_ood_export["saved_model"])).signatures[
        "serving_default"]
    rng = np.random.default_rng(11)
    films = [phantoms.generate_phantom(rng, i % 2, phantoms.draw_size(rng, 300, 480))[0]
             for i in range(12)]
    photos = [cv2.cvtColor(im, cv2.COLOR_RGB2GRAY) for im in load_sample_images().images]

    def verdict(grays):
        return signature(images=tf.constant([_png(g) for g in grays]))["in_distribution"].numpy()

    assert not verdict(photos).any()
    assert not verdict([255 - f for f in films]).any()
    assert not verdict([np.rot90(f) for f in films[:4]]).any()
    assert verdict(films).mean() >= 0.8


# ---------------------------------------------------------------------------------------------
# The lung model in the graph: a --crop=lungs run


LUNG_OUTPUTS = {"lung_fraction": (np.float32, (4,)), "lung_confidence": (np.float32, (4,)),
                "lungs_found": (np.bool_, (4,))}


def test_the_bytes_signature_crops_to_the_lungs_as_the_converter_does(lung_crop_export, lung_run,
                                                                      tmp_path):
    """Host converter crop vs in-graph crop on the same files: the same boxes, the same lung
    shares, probabilities within 1e-3 (the area resizes differ by a grey level)."""
    import tensorflow as tf

    from pneumo_tf.core import rundir
    from pneumo_tf.evaluation import scoring
    from pneumo_tf.image import preprocess
    from pneumo_tf.modeling import lungs as lungs_lib
    from pneumo_tf.serving import lungs as lung_serving
    from pneumo_tf.data import decode

    run, _ = lung_crop_export
    lungs = lungs_lib.LungModel(lung_run[0])
    settings = lung_serving.LungSettings.from_json(
        json.loads((run / "export" / "pneumo_tf_serving.json").read_text())["lungs"])
    files = phantom_files(tmp_path / "img")
    names = sorted(files)
    host_images, fractions, same_box = [], [], []
    for name in names:
        decoded = decode.decode_bytes(files[name], name=name, target_size=SIZE, crop="lungs")
        finding = lungs.find([decoded.gray], settings.margin, settings.crop_min_fraction)[0]
        image, box, _ = preprocess.preprocess_gray(decoded.gray, SIZE, "lungs", finding.box)
        host_images.append(image)
        fractions.append(finding.fraction)
        gray = decode.tf_decode_gray(tf.constant(files[name]), SIZE, "lungs")
        lung = lung_serving.tf_film_lungs(lungs.model, gray, settings)
        graph_box = preprocess.tf_lung_crop_box(tf.shape(gray)[0], tf.shape(gray)[1], lung["box"])
        same_box.append(bool(lung["found"]) == (finding.box is not None) and (
            finding.box is None or tuple(int(v) for v in graph_box) == box))
    assert np.mean(same_box) >= 0.9, same_box  # a grey level may move a box edge by a cell
    served = tf.saved_model.load(str(run / "export" / "saved_model")).signatures[
        "serving_default"](images=tf.constant([files[n] for n in names]))
    keras_p = scoring.make_predict_fn(rundir.load_model(run))(np.stack(host_images)[..., None])
    diff = np.abs(served["probability"].numpy() - keras_p.numpy())[np.array(same_box)]
    assert diff.max() < 1e-3, diff.max()
    np.testing.assert_allclose(served["lung_fraction"].numpy(), fractions, atol=0.01)


def test_every_signature_gains_the_lung_outputs_and_parity_covers_them(lung_crop_export):
    import tensorflow as tf

    from pneumo_tf.serving import lungs as lung_serving

    run, report = lung_crop_export
    loaded = tf.saved_model.load(str(run / "export" / "saved_model"))
    assert set(loaded.signatures) == {"serving_default", "preprocessed", "preprocessed_float",
                                      "lungs"}
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, SIZE, SIZE, 1), dtype=np.uint8)
    calls = {"serving_default": {"images": tf.constant([_png(im[..., 0]) for im in images])},
             "preprocessed": {"image": tf.constant(images)},
             "preprocessed_float": {"image": tf.constant(images.astype(np.float32))}}
    for name, kwargs in calls.items():
        out = {k: (v.numpy().dtype, v.numpy().shape)
               for k, v in loaded.signatures[name](**kwargs).items()}
        assert {k: out[k] for k in LUNG_OUTPUTS} == LUNG_OUTPUTS, name
        assert out["probability"] == (np.float32, (4,))
    lungs_out = loaded.signatures["lungs"](image=tf.constant(images))
    assert lungs_out["lung_mask"].shape == (4, 32, 32)
    config = json.loads((run / "export" / "pneumo_tf_serving.json").read_text())
    assert config["crop"] == "lungs" and config["lungs"]["confidence_source"] == "lung_guard.json"
    assert report["passed"] and report["outputs"]["lungs"]
    assert report["lungs"]["model"] == config["lungs"]
    sm, fp16 = report["lungs"]["variants"]["saved_model"], report["lungs"]["variants"]["fp16"]
    assert sm["dice"] == 1.0 and sm["max_abs_prob_diff"] < 1e-5
    assert fp16["dice"] > 0.98 and fp16["path"] == lung_serving.LUNG_TFLITE_NAME
    assert (run / "export" / lung_serving.LUNG_TFLITE_NAME).is_file()


def test_lung_crop_runs_name_a_missing_or_wrong_lung_model(lung_crop_run, lung_run,
                                                           tiny_run, tmp_path):
    from pneumo_tf.core import rundir
    from pneumo_tf.serving import export
    from pneumo_tf.serving import lungs as lung_serving

    run, _ = lung_crop_run
    moved = tmp_path / "run"
    shutil.copytree(run, moved, ignore=shutil.ignore_patterns("export"))
    manifest = json.loads((moved / "data_manifest.json").read_text())
    manifest["lung_model"]["path"] = str(tmp_path / "gone")
    (moved / "data_manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(rundir.RunDirError, match=r"which is missing; pass --lung_model="):
        export.export_run(moved, ["tflite"])
    classifier = tiny_run[0]
    with pytest.raises(rundir.RunDirError, match=r"not a lung model"):
        export.export_run(moved, ["tflite"], lungs=lung_serving.LungOptions(str(classifier)))
    with pytest.raises(rundir.RunDirError, match=r"is a lung model .*--lung_model="):
        export.export_run(lung_run[0], ["tflite"])
    assert not (moved / "export").exists()


@pytest.mark.slow
def test_export_cli_takes_a_lung_model_for_any_classifier(run_and_data, lung_run, tmp_path):
    run, data = run_and_data
    copy = tmp_path / "run"
    shutil.copytree(run, copy, ignore=shutil.ignore_patterns("export"))
    write_calibration(copy)
    done = run_command("pneumo_tf.export", f"--run_dir={copy}", f"--data_dir={data}",
                      "--formats=saved_model", "--parity_count=4", f"--lung_model={lung_run[0]}",
                      "--min_lung_fraction=0.2", "--min_lung_confidence=0.3")
    assert done.returncode == 0, done.stderr[-2000:]
    lungs = json.loads((copy / "export" / "parity.json").read_text())["lungs"]["model"]
    assert "lung model:" in done.stdout
    assert (lungs["min_lung_fraction"], lungs["min_lung_confidence"], lungs["crop_min_fraction"]) \
        == (0.2, 0.3, 0.1)
    assert json.loads((copy / "export" / "pneumo_tf_serving.json").read_text())["crop"] == "fixed"
    bad = run_command("pneumo_tf.export", f"--run_dir={copy}", "--formats=tflite",
                     f"--lung_model={tmp_path / 'nowhere'}")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1].startswith(
        "pneumo_tf.export: error: --lung_model=") and "no such directory" in bad.stderr
