"""Refer reasons: the film checks on the host and in the graph, the rule, and predict and the
SavedModel's bytes signature giving the same label, in_distribution, refer and reasons."""

from __future__ import annotations

import io
import json

import cv2
import numpy as np
import pytest
from PIL import Image

from pneumo_tf.serving import refer


def _film(h: int, w: int, label: int = 1, seed: int = 0) -> np.ndarray:
    from pneumo_tf.data import phantoms

    return phantoms.generate_phantom(np.random.default_rng(seed), label, (h, w))[0]


def _graph_film_reasons(gray: np.ndarray, orig_hw, crop_hw, image_size: int) -> list[str]:
    import tensorflow as tf

    stats = refer.tf_film_statistics(tf.constant(gray[..., None]), tf.constant(orig_hw),
                                     tf.constant(crop_hw))
    flags = refer.film_flags(stats, image_size)
    return [name for name in refer.FILM_REASONS if bool(flags[name])]


# ---------------------------------------------------------------------------------------------
# The film checks


FILM = _film(400, 520)
FILM_CASES = {  # name: (gray, orig_hw, crop_hw, image size, reasons)
    "film": (FILM, (400, 520), (300, 312), 224, []),
    "blank": (np.full((400, 520), 128, np.uint8), (400, 520), (300, 312), 224, ["blank"]),
    "black": (np.zeros((400, 520), np.uint8), (400, 520), (300, 312), 224,
              ["blank", "underexposed"]),
    "strip": (_film(100, 900), (100, 900), (75, 540), 32, ["aspect_ratio"]),
    "dark": ((FILM * 0.3).astype(np.uint8), (400, 520), (300, 312), 224, ["underexposed"]),
    "bright": (np.clip(FILM.astype(int) + 200, 0, 255).astype(np.uint8), (400, 520), (300, 312),
               224, ["overexposed"]),
    "crop_at_half": (FILM, (400, 520), (150, 156), 224, []),
    "small_crop": (FILM, (400, 520), (100, 156), 224, ["low_resolution"]),
    # DCT-reduced by 4: the statistics of the reduced film, the sizes of the full one.
    "reduced": (FILM[::4, ::4], (1600, 2080), (1200, 1248), 224, []),
}


@pytest.mark.parametrize("name", sorted(FILM_CASES))
def test_film_checks_flag_unlike_films_alike_on_the_host_and_in_the_graph(name):
    gray, orig_hw, crop_hw, size, expected = FILM_CASES[name]
    assert refer.film_refer_reasons(gray, *orig_hw, crop_hw, size) == expected
    assert _graph_film_reasons(gray, orig_hw, crop_hw, size) == expected


def test_film_statistics_in_the_graph_are_the_hosts():
    import tensorflow as tf

    rng = np.random.default_rng(1)
    for gray in [FILM, rng.integers(0, 256, (37, 53), dtype=np.uint8), FILM_CASES["dark"][0]]:
        host = refer.film_statistics(gray, (401, 517), (120, 99))
        graph = refer.tf_film_statistics(tf.constant(gray[..., None]), (401, 517), (120, 99))
        assert set(graph) == set(host)
        for key, value in host.items():
            assert float(graph[key]) == pytest.approx(value, rel=1e-9, abs=1e-12), key


# ---------------------------------------------------------------------------------------------
# The rule


def _decide(found=(), rejected=False, near=False, guarded=True) -> tuple:
    """``(in_distribution, refer, reason names)`` of :func:`refer.decide` on host values."""
    checks = {name: np.bool_(name in found) for name in refer.CHECKS}
    decided = refer.decide(checks, np.bool_(rejected), np.bool_(near), guarded)
    verdict = None if decided["in_distribution"] is None else bool(decided["in_distribution"])
    return verdict, bool(decided["refer"]), refer.reason_names(decided["reasons"])


def test_the_refer_rule():
    assert _decide() == (True, False, [])
    assert _decide(rejected=True) == (False, True, [refer.NOT_A_CHEST_FILM])
    assert _decide([refer.INVERTED], rejected=True) == (
        False, True, [refer.INVERTED, refer.NOT_A_CHEST_FILM])
    # Each reason true of the input: the upside-down probe reads features as a film's, so an
    # input the feature score rejects is not called upside down (a photo is not a film).
    assert _decide([refer.UPSIDE_DOWN], rejected=True) == (False, True, [refer.NOT_A_CHEST_FILM])
    assert _decide([refer.UPSIDE_DOWN]) == (False, True, [refer.UPSIDE_DOWN])
    # uncertain only for what gets a diagnosis; film checks and no lungs refer, keep the label.
    assert _decide(near=True) == (True, True, [refer.UNCERTAIN])
    assert _decide(near=True, rejected=True) == (False, True, [refer.NOT_A_CHEST_FILM])
    assert _decide([refer.NO_LUNGS_FOUND, refer.BLANK], near=True) == (
        True, True, [refer.UNCERTAIN, refer.BLANK, refer.NO_LUNGS_FOUND])
    # Without a guard: no verdict, every check still refers.
    assert _decide([refer.ON_ITS_SIDE], near=True, guarded=False) == (
        None, True, [refer.UNCERTAIN, refer.ON_ITS_SIDE])


def test_the_reasons_have_one_order_and_the_graph_joins_them_in_it():
    import tensorflow as tf

    assert len(set(refer.REFER_REASONS)) == len(refer.REFER_REASONS)
    assert set(refer.REFER_REASONS) == set(refer.CHECKS) | {refer.UNCERTAIN,
                                                             refer.NOT_A_CHEST_FILM}
    flags = np.random.default_rng(0).random((64, len(refer.REFER_REASONS))) < 0.3
    flags[0] = False
    reasons = {name: tf.constant(flags[:, k]) for k, name in enumerate(refer.REFER_REASONS)}
    out = refer.tf_refer_outputs({"reasons": reasons, "refer": tf.constant(flags.any(axis=1))})
    np.testing.assert_array_equal(out["refer_reason_flags"].numpy(), flags)
    expected = [refer.REASON_SEPARATOR.join(refer.reason_names(dict(zip(refer.REFER_REASONS,
                                                                        row))))
                for row in flags]
    assert [s.decode() for s in out["refer_reasons"].numpy()] == expected
    assert expected[0] == ""


# ---------------------------------------------------------------------------------------------
# predict and serving_default on the same bytes


def _exif6_jpeg(gray: np.ndarray) -> bytes:
    """``gray`` stored on its side with EXIF orientation 6: upright once it is applied."""
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(np.rot90(gray, 1))).save(buf, "JPEG", exif=exif,
                                                                  quality=95)
    return buf.getvalue()


def _png(gray: np.ndarray) -> bytes:
    return cv2.imencode(".png", np.ascontiguousarray(gray))[1].tobytes()


@pytest.fixture(scope="module")
def odd_inputs(tmp_path_factory) -> dict:
    """``{file: kind}``: a photo, and per phantom film itself, inverted, on its side, upside
    down, shrunk to a tiny image and as an EXIF-rotated JPEG."""
    from sklearn.datasets import load_sample_images

    root = tmp_path_factory.mktemp("odd_inputs")
    photo = cv2.cvtColor(load_sample_images().images[0], cv2.COLOR_RGB2BGR)
    (root / "photo.jpeg").write_bytes(cv2.imencode(".jpg", photo)[1].tobytes())
    files = {root / "photo.jpeg": "photo"}
    for i in range(4):
        film = _film(300 + 20 * i, 380 + 10 * i, label=i % 2, seed=5 + i)
        encoded = {"film": _png(film), "inverted": _png(255 - film),
                   "sideways": _png(np.rot90(film)), "upside_down": _png(film[::-1]),
                   "tiny": _png(cv2.resize(film, (38 + i, 30 + i), interpolation=cv2.INTER_AREA)),
                   "exif6": _exif6_jpeg(film)}
        for kind, data in encoded.items():
            path = root / f"{kind}_{i}.{'jpeg' if kind == 'exif6' else 'png'}"
            path.write_bytes(data)
            files[path] = kind
    return files


def _both_answers(run_dir, saved_model, paths) -> tuple[list, list]:
    """``(predict's, serving_default's)`` ``(label, in_distribution, refer, reasons)`` per file:
    predict on the host with the run's Keras model, the signature on the files' bytes; a label
    null in predict is -1 in the signature."""
    import tensorflow as tf

    from pneumo_tf.serving import predictor as predict

    rows = list(predict.predict_paths(predict.load_predictor(run_dir), paths))
    host = [(-1 if r["label"] is None else r["label"], r["in_distribution"], r["refer"],
             r["refer_reasons"]) for r in rows]
    signature = tf.saved_model.load(str(saved_model)).signatures["serving_default"]
    out = {k: v.numpy() for k, v in signature(
        images=tf.constant([p.read_bytes() for p in paths])).items()}
    names = json.loads((saved_model / "assets.extra" / "pneumo_tf_serving.json").read_text())[
        "refer_reason_names"]
    assert names == list(refer.REFER_REASONS)
    graph = []
    for i in range(len(paths)):
        reasons = out["refer_reasons"][i].decode()
        reasons = reasons.split(refer.REASON_SEPARATOR) if reasons else []
        assert reasons == [n for n, f in zip(names, out["refer_reason_flags"][i]) if f]
        verdict = bool(out["in_distribution"][i]) if "in_distribution" in out else None
        graph.append((int(out["label"][i]), verdict, bool(out["refer"][i]), reasons))
    return host, graph


def test_predict_and_the_bytes_signature_refer_alike(phantom_ood_export, odd_inputs):
    paths = list(odd_inputs)
    host, graph = _both_answers(phantom_ood_export["run_dir"], phantom_ood_export["saved_model"],
                                paths)
    for path, h, g in zip(paths, host, graph):
        assert h == g, path.name
    by_kind: dict[str, list] = {}
    for (label, inside, referred, reasons), kind in zip(host, odd_inputs.values()):
        by_kind.setdefault(kind, []).append(reasons)
        if not inside:
            assert label == -1 and referred, kind
    assert by_kind["photo"] == [[refer.NOT_A_CHEST_FILM]]
    assert all(refer.INVERTED in r for r in by_kind["inverted"])
    assert all(refer.ON_ITS_SIDE in r for r in by_kind["sideways"])
    # Upside down: referred for it, or earlier by the feature score (which then names it alone;
    # the probe by itself is tested below).
    assert all(refer.UPSIDE_DOWN in r or r == [refer.NOT_A_CHEST_FILM]
               for r in by_kind["upside_down"])
    assert all(refer.LOW_RESOLUTION in r for r in by_kind["tiny"])
    # Upright by its EXIF orientation: what the same film gets as a PNG, not on its side.
    assert all(refer.ON_ITS_SIDE not in r for r in by_kind["exif6"])
    verdicts = {kind: [h[1] for h, k in zip(host, odd_inputs.values()) if k == kind]
                for kind in ("film", "exif6")}
    assert verdicts["exif6"] == verdicts["film"]


def test_the_upside_down_probe_alone_refers_alike(phantom_ood_run, odd_inputs, tmp_path):
    """With the feature score out of the way (a copy of the guard whose threshold nothing
    reaches), the orientation probe alone refers every upside-down film, in predict and in the
    graph alike, and leaves the films as they are in distribution."""
    import shutil

    from pneumo_tf.core import rundir
    from pneumo_tf.serving import export

    run, data, _ = phantom_ood_run
    copy = shutil.copytree(run, tmp_path / "run", ignore=shutil.ignore_patterns("export"))
    ood_json = rundir.RunPaths(copy).ood_json
    guard = json.loads(ood_json.read_text())
    guard["threshold"] = 1e30
    ood_json.write_text(json.dumps(guard))
    export.export_run(copy, ["saved_model"], data_dir=data, parity_count=4)
    paths = [p for p, kind in odd_inputs.items() if kind in ("upside_down", "film")]
    host, graph = _both_answers(copy, copy / "export" / "saved_model", paths)
    assert host == graph
    for path, (_, inside, referred, reasons) in zip(paths, host):
        if odd_inputs[path] == "upside_down":
            assert not inside and referred and refer.UPSIDE_DOWN in reasons, path.name
            assert refer.NOT_A_CHEST_FILM not in reasons, path.name
        else:
            assert inside and refer.UPSIDE_DOWN not in reasons, path.name


def test_no_lungs_found_in_the_graph_as_on_the_host(lung_crop_export, lung_run, tmp_path):
    """A run without a guard and with its lung model baked in: no in_distribution, labels for
    every input, and no_lungs_found where the lung model finds none (a blank page)."""
    page = tmp_path / "page.png"
    page.write_bytes(_png(np.full((400, 300), 235, np.uint8)))
    paths = sorted((lung_run[1] / "test").rglob("*.jpeg"))[:4] + [page]
    run, _ = lung_crop_export
    host, graph = _both_answers(run, run / "export" / "saved_model", paths)
    assert host == graph
    assert all(inside is None and label in (0, 1) for label, inside, _, _ in host)
    assert refer.NO_LUNGS_FOUND in host[-1][3]
