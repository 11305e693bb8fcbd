"""LaMa random_thick masks and the 0.5 all-ones training rule."""

import numpy as np
import pytest

from asymvq_jax.data.masks import (
    MASK_VARIANTS,
    box_mask,
    example_rng,
    irregular_mask,
    lama_mask,
    training_mask,
)

N = 400


def _areas(variant, size, n=N, seed=0):
    return np.array([lama_mask(example_rng(seed, i), size, size, variant).mean() for i in range(n)])


def test_thick_256_mean_hole_area_matches_lama():
    # SPEC: thick-256 averages about 37 % hole area. Per-mask std is ~0.195, so the
    # standard error of a 400-mask mean is ~0.01; +-0.04 is a 4-sigma band.
    a = _areas("thick_256", 256)
    assert abs(a.mean() - 0.37) < 0.04, a.mean()
    # Masks are neither empty nor trivially full, and really vary.
    assert a.min() > 0.0 and (a < 1.0).all()
    assert a.std() > 0.1


def test_thick_512_is_larger_than_256_and_scale_invariant():
    a512 = _areas("thick_512", 512, n=200)
    assert 0.34 < a512.mean() < 0.50, a512.mean()
    # Drawn at the variant's scale: a 256-pixel output of thick_256 drawn at 512 output
    # has the same statistics (within sampling noise).
    a256_at_512 = _areas("thick_256", 512, n=200)
    assert abs(a256_at_512.mean() - 0.37) < 0.05, a256_at_512.mean()


def test_mask_format_and_non_square_sizes():
    for h, w in [(256, 256), (128, 192), (512, 384), (64, 64)]:
        m = lama_mask(example_rng(1, h, w), h, w, "thick_256")
        assert m.shape == (h, w, 1) and m.dtype == np.float32
        assert set(np.unique(m)) <= {0.0, 1.0}


def test_reproducible_and_seed_dependent():
    a = training_mask(example_rng(7, 3, 5), 256, 256)
    b = training_mask(example_rng(7, 3, 5), 256, 256)
    np.testing.assert_array_equal(a, b)
    ms = [lama_mask(example_rng(7, 3, k), 256, 256).tobytes() for k in range(20)]
    assert len(set(ms)) == 20


def test_all_ones_rule_frequency():
    n = 1000
    full = sum(
        bool(training_mask(example_rng(3, i), 64, 64, all_ones_prob=0.5).min() == 1.0)
        for i in range(n)
    )
    # Binomial(1000, 0.5): std 15.8; +-80 is 5 sigma. A LaMa mask is never all ones.
    assert abs(full - n / 2) < 80, full
    assert all(training_mask(example_rng(4, i), 32, 32, all_ones_prob=1.0).all() for i in range(20))
    assert not any(training_mask(example_rng(5, i), 64, 64, all_ones_prob=0.0).all() for i in range(50))


def test_strokes_and_boxes_follow_parameters():
    p = MASK_VARIANTS["thick_256"]
    # Boxes keep the 10-pixel margin and their sides are within [30, 150).
    for i in range(100):
        m = box_mask(example_rng(11, i), 256, 256, p)
        assert m.any()
        assert not m[:10].any() and not m[-10:].any()
        assert not m[:, :10].any() and not m[:, -10:].any()
        rows = np.flatnonzero(m.any(1))
        assert rows.max() - rows.min() + 1 >= 30
    # Strokes are thick (min brush 5 -> area far above a 1-px line) and non-empty.
    areas = [irregular_mask(example_rng(12, i), 256, 256, p).mean() for i in range(100)]
    assert min(areas) > 0.002
    # The mixture: first draw u, boxes when u * (1 + 0.3) >= 1 (weights 1 : 0.3, so
    # about 23 % boxes), then the chosen generator continues on the same stream.
    boxes = 0
    for i in range(300):
        rng = example_rng(13, i)
        is_box = rng.random() * 1.3 >= 1.0
        boxes += is_box
        ref = (box_mask if is_box else irregular_mask)(rng, 256, 256, p)
        np.testing.assert_array_equal(lama_mask(example_rng(13, i), 256, 256)[..., 0], ref)
    assert 0.15 < boxes / 300 < 0.32, boxes


def test_unknown_variant_raises():
    with pytest.raises(ValueError, match="thick_256"):
        lama_mask(example_rng(0), 64, 64, "thin_999")
    # LaMa's own names are accepted.
    assert lama_mask(example_rng(0), 64, 64, "random_thick_512").shape == (64, 64, 1)
