import numpy as np

from modeling_moa_depthclip.visualization import (
    _turbo_polynomial,
    colorize_depth,
    grayscale_depth,
    normalize_depth,
    turbo,
)


def test_turbo_table_matches_the_polynomial_within_one_level():
    values = np.random.default_rng(0).random((200, 300))
    assert np.abs(turbo(values).astype(int) - _turbo_polynomial(values).astype(int)).max() <= 1
    assert turbo(np.array([0.0, 1.0])).tolist() == _turbo_polynomial(np.array([0.0, 1.0])).tolist()


def test_near_is_red_and_far_is_blue():
    depth = np.array([[1.0, 8.0, 9.0]], dtype=np.float32)
    near, far, _ = np.asarray(colorize_depth(depth))[0]  # Turbo's far end fades to dark: compare at 7/8
    assert near[0] > near[2] and far[2] > far[0]


def test_normalisation_range_constant_maps_and_nan():
    depth = np.array([[2.0, 4.0, np.nan, 6.0]], dtype=np.float32)
    assert normalize_depth(depth).tolist() == [[0.0, 0.5, 0.0, 1.0]]
    assert normalize_depth(depth, vmin=0.0, vmax=8.0).tolist() == [[0.25, 0.5, 0.0, 0.75]]
    constant = np.full((4, 4), 3.0, dtype=np.float32) + np.float32(1e-7) * np.eye(4, dtype=np.float32)
    assert not normalize_depth(constant).any()
    assert np.asarray(grayscale_depth(constant)).max() == 0
    assert np.asarray(grayscale_depth(depth)).tolist() == [[0, 128, 0, 255]]
