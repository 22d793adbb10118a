"""Tests for file reading and the depth-unit rule."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip.data import DepthUnitWarning, depth_to_metres, read_depth_image, sanitize_depth


def test_sanitize_depth_marks_invalid_as_zero_without_mutating_input():
    raw = np.array([0.0, -1.0, np.nan, np.inf, 12.0, 5.0, 10.0, 0.05], dtype=np.float32)
    out = sanitize_depth(raw, min_depth=0.1, max_depth=10.0)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, 5, 10, 0])
    assert out.dtype == np.float32
    assert np.isnan(raw[2]) and raw[4] == 12.0
    # no bounds: only non-finite and non-positive values are invalid
    np.testing.assert_array_equal(sanitize_depth(raw), np.array([0, 0, 0, 0, 12, 5, 10, 0.05], np.float32))


def test_one_unit_rule_for_files_and_arrays(tmp_path):
    mm = np.array([[0, 1500, 65535]], np.uint16)
    Image.fromarray(mm).save(tmp_path / "mm.png")
    np.testing.assert_allclose(read_depth_image(tmp_path / "mm.png"), [[0, 1.5, 65.535]], rtol=1e-6)
    np.testing.assert_allclose(depth_to_metres(mm), [[0, 1.5, 65.535]], rtol=1e-6)
    # 8-bit depth is DenseDepth's nyu2_train scale (255 -> 10 m) for a file and an array alike
    eight = np.array([[0, 51, 255]], np.uint8)
    Image.fromarray(eight).save(tmp_path / "eight.png")
    np.testing.assert_allclose(read_depth_image(tmp_path / "eight.png"), [[0, 2, 10]], rtol=1e-6)
    np.testing.assert_allclose(depth_to_metres(eight), [[0, 2, 10]], rtol=1e-6)
    # floating point is metres
    np.testing.assert_array_equal(depth_to_metres(np.array([[2.5]], np.float32)), [[2.5]])
    # explicit units win over the stored type
    np.testing.assert_allclose(read_depth_image(tmp_path / "mm.png", depth_unit="cm"), [[0, 15, 655.35]], rtol=1e-6)
    np.testing.assert_allclose(depth_to_metres(mm, depth_scale=100.0), [[0, 15, 655.35]], rtol=1e-6)
    np.testing.assert_allclose(depth_to_metres(eight, depth_unit="m"), [[0, 51, 255]])
    with pytest.raises(ValueError, match="unknown depth_unit 'inch'"):
        depth_to_metres(mm, depth_unit="inch")
    with pytest.raises(ValueError, match="disagree"):
        depth_to_metres(mm, depth_unit="mm", depth_scale=100.0)


def test_uint16_png_holding_metres_warns_and_reads_with_the_unit_given(tmp_path):
    path = tmp_path / "metres_depth.png"
    Image.fromarray(np.array([[0, 1, 3, 7]], np.uint16)).save(path)
    with pytest.warns(DepthUnitWarning, match=r"metres_depth\.png.*depth_unit='m'"):
        read_depth_image(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(read_depth_image(path, depth_unit="m"), [[0, 1, 3, 7]])
    # float metres that are really millimetres
    with pytest.warns(DepthUnitWarning, match="millimetres"):
        depth_to_metres(np.array([[1500.0, 4200.0]], np.float32), where="frame")


def test_missing_and_multichannel_depth_files_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.png"):
        read_depth_image(tmp_path / "nowhere.png")
    rgb = np.zeros((2, 3, 3), np.uint8)
    rgb[..., 1] = 9
    Image.fromarray(rgb).save(tmp_path / "colour.png")
    with pytest.raises(ValueError, match="colour.png has 3 different channels"):
        read_depth_image(tmp_path / "colour.png")
