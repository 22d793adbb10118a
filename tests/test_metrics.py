"""Tests for the NYU depth metrics, crops and the distributed-safe accumulator."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from modeling_moa_depthclip.evaluation.metrics import (
    METRIC_KEYS,
    DepthMetricsAccumulator,
    NoValidDepthError,
    compute_depth_metrics,
    eigen_crop_mask,
    format_metrics_markdown,
    garg_crop_mask,
)
from modeling_moa_depthclip import MoADepthCLIPConfig

# the range of the NYU models: the config's defaults (the metrics take it as arguments, never as a default)
NYU = (MoADepthCLIPConfig().min_depth, MoADepthCLIPConfig().max_depth)

# --- hand-computed values on a 2x2 example ---------------------------------------------------
GT = np.array([[1.0, 2.0], [4.0, 8.0]])
PRED = np.array([[1.0, 2.5], [2.0, 8.0]])
# ratios max(p/g, g/p) = 1, 1.25, 2, 1; log(p/g) = 0, log 1.25, -log 2, 0
LOG_D = np.array([0.0, math.log(1.25), -math.log(2.0), 0.0])
EXPECTED = {
    "d1": 0.5,  # 1.25 is not < 1.25
    "d2": 0.75,
    "d3": 0.75,
    "abs_rel": (0 + 0.5 / 2 + 2 / 4 + 0) / 4,
    "sq_rel": (0 + 0.25 / 2 + 4 / 4 + 0) / 4,
    "rmse": math.sqrt((0 + 0.25 + 4 + 0) / 4),
    "rmse_log": math.sqrt(np.mean(LOG_D**2)),
    "log10": (math.log10(1.25) + math.log10(2.0)) / 4,
    "silog": math.sqrt(np.mean(LOG_D**2) - np.mean(LOG_D) ** 2) * 100,
}


def test_metrics_match_hand_computed_values():
    metrics = compute_depth_metrics(PRED, GT, *NYU, crop=None)
    assert tuple(metrics) == METRIC_KEYS
    for key, value in EXPECTED.items():
        assert metrics[key] == pytest.approx(value, rel=1e-9, abs=1e-12), key


def test_metrics_accept_torch_tensors():
    metrics = compute_depth_metrics(torch.tensor(PRED, dtype=torch.float32), torch.tensor(GT), *NYU, crop=None)
    assert metrics["abs_rel"] == pytest.approx(EXPECTED["abs_rel"], rel=1e-6)


def test_invalid_ground_truth_is_masked_and_prediction_clamped():
    gt = np.array([[2.0, 0.0, np.nan], [11.0, np.inf, 5.0]])
    pred = np.array([[2.0, 7.0, 7.0], [7.0, 7.0, 50.0]])  # 50 is clamped to max_depth=10
    metrics = compute_depth_metrics(pred, gt, *NYU, crop=None)
    # Only (0,0) and (1,2) are valid: errors 0 and |5 - 10| / 5 = 1.
    assert metrics["abs_rel"] == pytest.approx(0.5)
    assert metrics["rmse"] == pytest.approx(math.sqrt(25 / 2))
    assert metrics["d1"] == pytest.approx(0.5)


def test_nonfinite_prediction_counts_as_wrong():
    gt = np.full((2, 2), 2.0)
    pred = np.array([[2.0, np.nan], [2.0, 2.0]])
    assert compute_depth_metrics(pred, gt, *NYU, crop=None)["d1"] == pytest.approx(0.75)


def test_prediction_resized_to_ground_truth():
    gt = np.full((8, 8), 3.0)
    metrics = compute_depth_metrics(np.full((4, 4), 3.0), gt, *NYU, crop=None)
    assert metrics["rmse"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["d1"] == 1.0


def test_shape_and_empty_errors():
    with pytest.raises(ValueError, match=r"\(1, 2, 2\)"):
        compute_depth_metrics(np.ones((1, 2, 2)), np.ones((2, 2)), *NYU, crop=None)
    with pytest.raises(NoValidDepthError, match="no valid"):
        compute_depth_metrics(np.ones((2, 2)), np.zeros((2, 2)), *NYU, crop=None)
    with pytest.raises(ValueError, match="crop"):
        compute_depth_metrics(np.ones((2, 2)), np.ones((2, 2)), *NYU, crop="kitti")


def test_the_range_is_an_argument_an_outdoor_range_counts_far_pixels():
    """Depth beyond 10 m is valid ground truth under an 80 m range and invalid under the NYU one."""
    gt = np.array([[2.0, 30.0], [60.0, 0.0]])
    pred = np.array([[2.0, 30.0], [30.0, 5.0]])
    far = compute_depth_metrics(pred, gt, 1e-3, 80.0, crop=None)
    assert far["abs_rel"] == pytest.approx(0.5 / 3)  # three valid pixels, one off by half
    assert compute_depth_metrics(pred, gt, *NYU, crop=None)["abs_rel"] == 0.0  # only the 2 m pixel
    with pytest.raises(TypeError):
        compute_depth_metrics(pred, gt)  # no default range
    with pytest.raises(TypeError):
        DepthMetricsAccumulator()


def test_eigen_crop_bounds():
    mask = eigen_crop_mask(480, 640)
    rows, cols = np.nonzero(mask)
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (45, 471, 41, 601)
    assert mask.sum() == (471 - 45) * (601 - 41)
    half = eigen_crop_mask(240, 320)
    assert half.sum() == pytest.approx(mask.sum() / 4, rel=0.02)


def test_garg_crop_bounds():
    rows, cols = np.nonzero(garg_crop_mask(480, 640))
    assert (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1) == (195, 476, 23, 616)


def test_eigen_crop_excludes_border_errors():
    gt = np.full((480, 640), 2.0)
    pred = np.full((480, 640), 100.0)
    pred[eigen_crop_mask(480, 640)] = 2.0
    assert compute_depth_metrics(pred, gt, *NYU, crop="eigen")["abs_rel"] == 0.0
    assert compute_depth_metrics(pred, gt, *NYU, crop=None)["abs_rel"] > 0.5
    custom = np.zeros((480, 640), bool)
    custom[100:110, 100:110] = True
    assert compute_depth_metrics(pred, gt, *NYU, crop=custom)["rmse"] == 0.0


# --- real NYU frames --------------------------------------------------------------------------


def test_nyu_ground_truth_as_prediction_is_perfect(nyu_sample_dataset):
    acc = DepthMetricsAccumulator(*NYU, crop="eigen")
    for example in nyu_sample_dataset:
        acc.update(example["depth"], example["depth"], name=example["name"])
    assert len(acc) == 25
    result = acc.compute()
    assert result["d1"] == result["d2"] == result["d3"] == 1.0
    for key in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"):
        assert result[key] == pytest.approx(0.0, abs=1e-9), key


def test_nyu_scaled_ground_truth(nyu_sample_dataset):
    # max_depth=15 so 1.3 * gt (up to 13 m) is not clamped, keeping the ratio exactly 1.3.
    acc = DepthMetricsAccumulator(NYU[0], 15.0, crop="eigen")
    for example in nyu_sample_dataset:
        gt = example["depth"].astype(np.float64)
        acc.update(gt * 1.3, gt, name=example["name"])
    result = acc.compute()
    assert result["d1"] == 0.0  # 1.3 > 1.25
    assert result["d2"] == 1.0  # 1.3 < 1.5625
    assert result["d3"] == 1.0
    assert result["abs_rel"] == pytest.approx(0.3, abs=1e-9)
    assert result["rmse_log"] == pytest.approx(math.log(1.3), abs=1e-9)
    assert result["log10"] == pytest.approx(math.log10(1.3), abs=1e-9)
    assert result["silog"] == pytest.approx(0.0, abs=1e-4)


def test_nyu_eigen_crop_is_applied(nyu_sample_dataset):
    gt = nyu_sample_dataset[0]["depth"]
    pred = gt.copy()
    pred[~eigen_crop_mask(*gt.shape)] = 0.5 * gt[~eigen_crop_mask(*gt.shape)]
    assert compute_depth_metrics(pred, gt, *NYU, crop="eigen")["d1"] == 1.0
    assert compute_depth_metrics(pred, gt, *NYU, crop=None)["d1"] < 1.0


# --- accumulator ------------------------------------------------------------------------------


def _frame(value: float) -> tuple[np.ndarray, np.ndarray]:
    gt = np.full((4, 4), 2.0)
    return gt * value, gt


def test_accumulator_means_over_images_and_dedups():
    acc = DepthMetricsAccumulator(*NYU, crop=None)
    acc.update(*_frame(1.0), name="a")
    acc.update(*_frame(1.5), name="b")
    acc.update(*_frame(3.0), name="a")  # repeated frame: ignored
    assert len(acc) == 2
    assert [r["name"] for r in acc.per_image] == ["a", "b"]
    assert acc.compute()["abs_rel"] == pytest.approx((0.0 + 0.5) / 2)


def test_accumulator_batched_update():
    acc = DepthMetricsAccumulator(*NYU, crop=None)
    pred = torch.stack([torch.full((1, 4, 4), 2.0), torch.full((1, 4, 4), 3.0)])
    gt = torch.full((2, 1, 4, 4), 2.0)
    results = acc.update(pred, gt, name=["x", "y"])
    assert [r["abs_rel"] for r in results] == pytest.approx([0.0, 0.5])
    assert acc.compute()["abs_rel"] == pytest.approx(0.25)


def _three_way_split():
    ranks = [DepthMetricsAccumulator(*NYU, crop=None) for _ in range(2)]
    ranks[0].update(*_frame(1.0), name="a")
    ranks[0].update(*_frame(1.5), name="b")
    ranks[1].update(*_frame(1.5), name="b")  # padded duplicate from a distributed sampler
    ranks[1].update(*_frame(2.0), name="c")
    return ranks


def test_accumulator_merge_state_objects():
    ranks = _three_way_split()
    gathered = [r.state() for r in ranks]  # what accelerate.utils.gather_object would return
    total = DepthMetricsAccumulator(*NYU).merge(gathered)
    assert len(total) == 3
    assert total.compute()["abs_rel"] == pytest.approx((0.0 + 0.5 + 1.0) / 3)
    assert sorted(r["name"] for r in total.per_image) == ["a", "b", "c"]
    # Merging the same results again must not change anything.
    total.merge(ranks[0]).merge(gathered)
    assert len(total) == 3


def test_accumulator_tensor_roundtrip_with_padding():
    ranks = _three_way_split()
    tensors = [r.to_tensor() for r in ranks]
    padding = torch.full((1, tensors[0].shape[1]), float("nan"))
    gathered = torch.cat([tensors[0], padding, tensors[1]])
    total = DepthMetricsAccumulator.from_tensor(gathered, min_depth=NYU[0], max_depth=NYU[1])
    assert len(total) == 3
    assert total.compute()["abs_rel"] == pytest.approx(0.5)
    # Tensor-derived frames still dedup against state records of the same frames.
    total.merge(ranks[1].state())
    assert len(total) == 3


def test_accumulator_empty_compute_raises():
    with pytest.raises(ValueError, match="no images"):
        DepthMetricsAccumulator(*NYU).compute()


def test_format_metrics_markdown():
    single = format_metrics_markdown(EXPECTED, precision=3)
    lines = single.splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("| d1 ↑ | d2 ↑ | d3 ↑ | abs_rel ↓")
    assert "| 0.500 | 0.750 | 0.750 | 0.188 |" in lines[2]
    multi = format_metrics_markdown({"ours": EXPECTED, "baseline": EXPECTED}, keys=("d1", "rmse"))
    assert multi.splitlines()[0] == "| model | d1 ↑ | rmse ↓ |"
    assert multi.splitlines()[3].startswith("| baseline | 0.5000 | 1.0308 |")
