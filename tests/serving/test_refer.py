"""Refer reasons: the film checks on the host and in the graph, the rule."""

from __future__ import annotations

import numpy as np
import pytest

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
