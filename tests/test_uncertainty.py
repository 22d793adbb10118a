"""Per-pixel uncertainty from the depth bins: the standard deviation, sparsification curves and AUSE, and the same
uncertainty through the model, image processor, pipeline, CLI, demo and ONNX."""

import json
import math

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_moa_depthclip.evaluation import evaluate, write_evaluation_outputs
from modeling_moa_depthclip.evaluation.uncertainty import (
    SparsificationAccumulator,
    ause,
    image_sparsification,
)
from modeling_moa_depthclip.losses import depth_bin_centers
from modeling_moa_depthclip.uncertainty import bin_distribution_std
from modeling_moa_depthclip import DepthCLIPConfig, DepthCLIPForDepthEstimation
from tiny_models import TINY_VISION, save_tiny_checkpoint, tiny_model, tiny_processor

FP32 = dict(rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- the standard deviation


def hand_built_bins(seed=0, size=(24, 32), num_bins=20, wrong_fraction=0.4):
    """Bin distributions built by hand: one-hot on the bin of the true depth where the depth is right, flat where it
    is wrong (and the true depth 1 m there, far from the flat distribution's mean). Returns probs (bins, H, W),
    centres, the ground truth and the wrong-pixel mask."""
    rng = np.random.default_rng(seed)
    centers = np.linspace(0.5, 9.5, num_bins)
    height, width = size
    true_bin = rng.integers(0, num_bins, size=size)
    wrong = rng.random(size) < wrong_fraction
    probs = np.zeros((num_bins, height, width))
    probs[true_bin, np.arange(height)[:, None], np.arange(width)[None, :]] = 1.0
    probs[:, wrong] = 1.0 / num_bins
    gt = np.where(wrong, 1.0, centers[true_bin])
    return probs, centers, gt, wrong


def test_bin_std_is_the_spread_of_the_distribution_in_metres():
    probs, centers, _, wrong = hand_built_bins()
    # a third kind: two bins 2 m apart with half the mass each: 1 m either side of the mean
    probs[:, 0, 0] = 0.0
    probs[[2, 6], 0, 0] = 0.5
    std = bin_distribution_std(torch.from_numpy(probs)[None].float(), torch.from_numpy(centers).float())[0].numpy()
    direct = np.empty(std.shape)
    for y in range(std.shape[0]):
        for x in range(std.shape[1]):
            p = probs[:, y, x]
            mean = sum(p_k * c_k for p_k, c_k in zip(p, centers))
            direct[y, x] = math.sqrt(sum(p_k * (c_k - mean) ** 2 for p_k, c_k in zip(p, centers)))
    np.testing.assert_allclose(std, direct, **FP32)
    assert std[0, 0] == pytest.approx(abs(centers[6] - centers[2]) / 2, rel=1e-5)
    right = ~wrong
    right[0, 0] = False
    assert np.all(std[right] == 0.0)  # one bin: no spread
    np.testing.assert_allclose(std[wrong], np.std(centers), rtol=1e-5)  # flat: the spread of the centres


def test_bin_std_in_float32_matches_float64_within_its_stated_bound():
    """Peaked to flat distributions over 128 bins in 0-10 m: float32 within 2.5 mm of the float64 spread."""
    centers = torch.linspace(0.001, 10.0, 128)
    generator = torch.Generator().manual_seed(0)
    for scale in (1.0, 3.0, 10.0, 30.0, 1000.0):
        probs = (torch.randn(2, 128, 16, 16, generator=generator) * scale).softmax(dim=1)
        exact = bin_distribution_std(probs.double(), centers.double())
        found = bin_distribution_std(probs, centers)
        assert found.dtype == torch.float32 and (found >= 0).all()
        assert float((found.double() - exact).abs().max()) < 2.5e-3, scale


def test_bin_std_names_a_bin_count_mismatch():
    with pytest.raises(ValueError, match="5 bins along dim 1, centers has 4"):
        bin_distribution_std(torch.ones(1, 5, 2, 2) / 5, torch.arange(4.0))


# ---------------------------------------------------------------- sparsification and AUSE


def test_sparsification_of_a_good_uncertainty_falls_and_its_ause_is_zero():
    probs, centers, gt, _ = hand_built_bins()
    pred = np.einsum("khw,k->hw", probs, centers)
    std = bin_distribution_std(torch.from_numpy(probs)[None], torch.from_numpy(centers))[0].numpy()
    curves = image_sparsification(pred, gt, std, min_depth=0.1, max_depth=10.0, crop=None,
                                  rng=np.random.default_rng(0))  # fmt: skip
    for metric, by_order in curves.items():
        curve, oracle, random = by_order["uncertainty"], by_order["oracle"], by_order["random"]
        assert np.all(np.diff(curve) <= 1e-12) and curve[-1] < 0.05 * curve[0], metric  # falls to ~0
        assert ause(curve, oracle) == pytest.approx(0.0, abs=1e-9), metric
        assert ause(random, oracle) > 0.2 * curve[0], metric  # a random order is far from it
    # a reversed ranking (trust the flat pixels most) is worse than random
    reversed_curves = image_sparsification(pred, gt, -std, min_depth=0.1, max_depth=10.0, crop=None,
                                           rng=np.random.default_rng(0))["abs_rel"]  # fmt: skip
    assert ause(reversed_curves["uncertainty"], reversed_curves["oracle"]) > ause(random, oracle)


def test_ause_of_a_worked_example():
    """Four pixels, removed in quarters.

    gt = [1, 2, 4, 5] m, pred = [2, 2, 2, 5] m, uncertainty = [0.1, 0.9, 0.5, 0.2]: removed most uncertain first,
    the order is pixels 1, 2, 3, 0.

    AbsRel terms |e|/gt = [1, 0, 0.5, 0]. Uncertainty curve: all 1.5/4 = 0.375; without pixel 1: 1.5/3 = 0.5; without
    1, 2: 1/2 = 0.5; only pixel 0 left: 1. Oracle (largest term first: pixels 0, 2, 1, 3): 0.375, 0.5/3, 0, 0.
    Differences 0, 1/3, 1/2, 1; trapezoids of width 1/4: (0 + 1/3)/8 + (1/3 + 1/2)/8 + (1/2 + 1)/8 = 1/3.

    RMSE terms e^2 = [1, 0, 4, 0]. Uncertainty curve: sqrt(5/4), sqrt(5/3), sqrt(1/2), 1. Oracle (pixels 2, 0, 1, 3):
    sqrt(5/4), sqrt(1/3), 0, 0. AUSE = (d1 + (d1 + d2) + (d2 + 1)) / 8 with d1 = sqrt(5/3) - sqrt(1/3),
    d2 = sqrt(1/2), i.e. (2 d1 + 2 d2 + 1) / 8 = 0.48019.
    """
    gt = np.array([[1.0, 2.0, 4.0, 5.0]])
    pred = np.array([[2.0, 2.0, 2.0, 5.0]])
    uncertainty = np.array([[0.1, 0.9, 0.5, 0.2]])
    fractions = (0.0, 0.25, 0.5, 0.75)
    curves = image_sparsification(pred, gt, uncertainty, min_depth=0.1, max_depth=10.0, crop=None,
                                  rng=np.random.default_rng(0), fractions=fractions)  # fmt: skip
    np.testing.assert_allclose(curves["abs_rel"]["uncertainty"], [0.375, 0.5, 0.5, 1.0])
    np.testing.assert_allclose(curves["abs_rel"]["oracle"], [0.375, 0.5 / 3, 0.0, 0.0])
    assert ause(curves["abs_rel"]["uncertainty"], curves["abs_rel"]["oracle"], fractions) == pytest.approx(1 / 3)
    np.testing.assert_allclose(curves["rmse"]["uncertainty"], np.sqrt([5 / 4, 5 / 3, 1 / 2, 1.0]))
    np.testing.assert_allclose(curves["rmse"]["oracle"], np.sqrt([5 / 4, 1 / 3, 0.0, 0.0]))
    d1, d2 = math.sqrt(5 / 3) - math.sqrt(1 / 3), math.sqrt(1 / 2)
    assert ause(curves["rmse"]["uncertainty"], curves["rmse"]["oracle"], fractions) == pytest.approx(
        (2 * d1 + 2 * d2 + 1) / 8
    )
    assert (2 * d1 + 2 * d2 + 1) / 8 == pytest.approx(0.48019, abs=1e-5)


def test_accumulator_averages_images_counts_a_frame_once_and_merges():
    probs, centers, gt, _ = hand_built_bins(seed=1)
    pred = np.einsum("khw,k->hw", probs, centers)
    std = bin_distribution_std(torch.from_numpy(probs)[None], torch.from_numpy(centers))[0].numpy()
    noise = np.random.default_rng(3).random(gt.shape)  # an uninformative uncertainty
    first = SparsificationAccumulator(0.1, 10.0, crop=None)
    assert first.update(pred, gt, std, "a") and not first.update(pred, gt, noise, "a")
    second = SparsificationAccumulator(0.1, 10.0, crop=None).merge(first.state())
    second.update(pred, gt, noise, "b")
    summary = second.compute()
    assert summary["num_images"] == 2
    alone = SparsificationAccumulator(0.1, 10.0, crop=None)
    alone.update(pred, gt, noise, "b")
    # the mean curve's area is the mean of the per-image areas
    assert summary["ause"]["rmse"] == pytest.approx((0.0 + alone.compute()["ause"]["rmse"]) / 2, abs=1e-9)
    # the random order depends on the seed and the frame name only
    again = SparsificationAccumulator(0.1, 10.0, crop=None)
    again.update(pred, gt, noise, "b")
    assert again.compute()["curves"] == alone.compute()["curves"]


def test_evaluate_writes_ause_json_markdown_and_plot(tmp_path):
    frames = []
    for seed in range(3):
        probs, centers, gt, _ = hand_built_bins(seed=seed, size=(48, 64))
        frames.append({"name": f"f{seed}", "image": Image.new("RGB", (64, 48)), "depth": gt.astype(np.float32),
                       "pred": np.einsum("khw,k->hw", probs, centers),
                       "std": bin_distribution_std(torch.from_numpy(probs)[None], torch.from_numpy(centers))[0].numpy(),
                       })  # fmt: skip

    def predict_fn(batch):
        return [f["pred"] for f in batch], [f["std"] for f in batch]

    result = evaluate(None, None, frames, crop=None, min_depth=0.1, max_depth=10.0, predict_fn=predict_fn,
                      uncertainty=True, show_progress=False, batch_size=2)  # fmt: skip
    summary = result["uncertainty"]
    assert summary["num_images"] == 3 and summary["fractions"][0] == 0.0 and summary["fractions"][-1] == 0.95
    assert summary["ause"]["abs_rel"] == pytest.approx(0.0, abs=1e-9)
    assert summary["aurg"]["abs_rel"] > 0 and summary["ause_random"]["rmse"] > 0
    assert summary["curves"]["abs_rel"]["uncertainty"][0] == pytest.approx(result["metrics"]["abs_rel"])
    paths = write_evaluation_outputs(result, tmp_path, "hand-built bins")
    written = json.loads(paths["metrics_json"].read_text())
    assert written["uncertainty"]["ause"] == summary["ause"]
    assert "AUSE" in paths["metrics_md"].read_text()
    assert Image.open(paths["sparsification_png"]).size[0] > 400

    from conversion.model_card import load_metrics, results_section

    card = results_section(load_metrics(paths["metrics_json"]))
    assert f"| AbsRel | {summary['ause']['abs_rel']:.4f} | {summary['ause_random']['abs_rel']:.4f} |" in card


def test_evaluate_refuses_uncertainty_of_a_regression_model():
    with pytest.raises(ValueError, match="no depth bins \\(head='regression'\\)"):
        evaluate(tiny_model(head="regression"), tiny_processor(), [], uncertainty=True, show_progress=False)


# ---------------------------------------------------------------- the model and its post-processing


@pytest.mark.parametrize("head", ["hybrid", "classification"])
def test_model_uncertainty_is_the_std_of_its_bins_upsampled_like_the_depth(head):
    model = tiny_model(head=head)
    pixel_values = torch.randn(2, 3, 64, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    std = bin_distribution_std(outputs.bin_logits.softmax(dim=1), depth_bin_centers(model.config))
    expected = torch.nn.functional.interpolate(std[:, None], size=(64, 96), mode="bilinear")[:, 0]
    assert outputs.depth_uncertainty.shape == outputs.predicted_depth.shape == (2, 64, 96)
    torch.testing.assert_close(outputs.depth_uncertainty, expected)
    assert "depth_uncertainty" in model.config.keys_to_ignore_at_inference  # Trainer predictions stay depth-only


def test_regression_head_has_no_uncertainty():
    with torch.no_grad():
        outputs = tiny_model(head="regression")(pixel_values=torch.randn(1, 3, 64, 64))
    assert outputs.depth_uncertainty is None


def test_zero_shot_head_uncertainty_comes_from_its_seven_prompt_bins():
    torch.manual_seed(0)
    model = DepthCLIPForDepthEstimation(DepthCLIPConfig(vision_config=dict(TINY_VISION))).eval()
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1)))
    bins = torch.tensor(model.config.bin_depths)
    assert outputs.prompt_logits.shape[1] == len(bins) == 7
    probs = outputs.prompt_logits.softmax(dim=1)
    mean = torch.einsum("bkhw,k->bhw", probs, bins)
    std = torch.einsum("bkhw,bkhw->bhw", probs, (bins[None, :, None, None] - mean[:, None]) ** 2).sqrt()
    expected = torch.nn.functional.interpolate(std[:, None], size=(64, 64), mode="bilinear")[:, 0]
    # the spread around the mean here, two weighted sums in the model: equal up to float32 cancellation
    torch.testing.assert_close(outputs.depth_uncertainty, expected, rtol=0, atol=2e-4)
    assert float(outputs.depth_uncertainty.max()) <= (max(bins) - min(bins)) / 2


def test_post_processing_resizes_uncertainty_and_fusion_weight_with_the_depth():
    model = tiny_model()
    with torch.no_grad():
        outputs = model(pixel_values=torch.randn(2, 3, 64, 64))
    results = tiny_processor().post_process_depth_estimation(outputs, [(48, 80), (64, 64)])
    for result, size in zip(results, [(48, 80), (64, 64)]):
        assert {k: tuple(v.shape) for k, v in result.items()} == {
            "predicted_depth": size, "uncertainty": size, "fusion_weight": size
        }  # fmt: skip
    expected = torch.nn.functional.interpolate(outputs.depth_uncertainty[:1, None], size=(48, 80), mode="bilinear")
    torch.testing.assert_close(results[0]["uncertainty"], expected[0, 0])
    torch.testing.assert_close(results[1]["uncertainty"], outputs.depth_uncertainty[1])
    weight = torch.nn.functional.interpolate(outputs.fusion_weight[:1, None], size=(48, 80), mode="bilinear")
    torch.testing.assert_close(results[0]["fusion_weight"], weight[0, 0])
    regression = tiny_model(head="regression")
    with torch.no_grad():
        regression_outputs = regression(pixel_values=torch.randn(1, 3, 64, 64))
    (only_depth,) = tiny_processor().post_process_depth_estimation(regression_outputs)
    assert set(only_depth) == {"predicted_depth"}


# ---------------------------------------------------------------- one picture, every way in


@pytest.fixture(scope="module")
def hybrid_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("uncertainty") / "hybrid"
    model = save_tiny_checkpoint(folder)
    return folder, model


@pytest.fixture(scope="module")
def picture(tmp_path_factory):
    rng = np.random.default_rng(5)
    path = tmp_path_factory.mktemp("picture") / "room.png"
    Image.fromarray(rng.integers(0, 256, size=(60, 90, 3), dtype=np.uint8)).save(path)
    return path


def test_pipeline_cli_demo_and_onnx_give_the_same_uncertainty(hybrid_folder, picture, tmp_path):
    from modeling_moa_depthclip.cli.predict import load_depth_pipeline, main as cli_main

    folder, _ = hybrid_folder
    depth_pipeline = load_depth_pipeline(str(folder), "cpu")
    result = depth_pipeline(str(picture))
    reference = result["uncertainty"]
    assert reference.dtype == np.float32 and reference.shape == (60, 90) and reference.max() > 0
    assert result["colored_uncertainty"].size == (90, 60) and result["colored_uncertainty"].mode == "RGB"

    # CLI
    assert cli_main(["predict", str(picture), "--model", str(folder), "--output-dir", str(tmp_path / "cli"),
                     "--uncertainty"]) == 0  # fmt: skip
    from_cli = np.load(tmp_path / "cli" / "room_uncertainty.npy")
    assert from_cli.dtype == np.float32
    np.testing.assert_allclose(from_cli, reference, **FP32)
    coloured = Image.open(tmp_path / "cli" / "room_uncertainty.png")
    assert coloured.height == 60 and coloured.width > 90  # the map and its colour bar

    # demo prediction function
    gr = pytest.importorskip("gradio")
    from test_demo import load_app

    app = load_app()
    demo = app.DepthDemo(depth_pipeline, "tiny")
    outputs = demo.predict(str(picture), "auto", 60.0)
    figure, npy, from_demo = outputs[-3:]
    np.testing.assert_allclose(from_demo, reference, **FP32)
    np.testing.assert_allclose(np.load(npy), reference, **FP32)
    assert figure.height == 60 and figure.width > 90
    event = gr.SelectData(None, {"index": [10, 20], "value": None})
    depth = result["metric_depth"]
    assert demo.uncertainty_at(from_demo, depth, event) == (
        f"±{reference[20, 10]:.3f} m (depth {depth[20, 10]:.3f} m) at pixel x=10, y=20"
    )

    # ONNX (second output of the exported graph)
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    from conversion import export_onnx as exporter
    from conversion.onnx_inference import OnnxDepthEstimator

    model, processor = exporter.load_model_and_processor(folder)
    path = exporter.export_onnx(model, processor, tmp_path / "model.onnx")
    from_onnx = OnnxDepthEstimator(path).estimate(str(picture))
    np.testing.assert_allclose(from_onnx["uncertainty"], reference, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(from_onnx["predicted_depth"], result["metric_depth"], rtol=1e-4, atol=1e-4)


def test_cli_says_in_one_line_that_a_regression_model_has_no_uncertainty(picture, tmp_path, capsys):
    from modeling_moa_depthclip.cli.predict import main as cli_main

    folder = tmp_path / "regression"
    save_tiny_checkpoint(folder, head="regression")
    out = tmp_path / "out"
    assert cli_main(["predict", str(picture), "--model", str(folder), "--output-dir", str(out), "--uncertainty"]) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "uncertainty" in line]
    assert len(lines) == 1 and "has no depth bins (head='regression')" in lines[0]
    assert sorted(p.name for p in out.iterdir()) == ["room_depth.npy", "room_depth.png", "room_depth_color.png"]


def test_onnx_of_a_regression_model_has_the_depth_alone(picture, tmp_path):
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnxscript")
    import onnx

    from conversion import export_onnx as exporter
    from conversion.onnx_inference import OnnxDepthEstimator

    folder = tmp_path / "regression"
    save_tiny_checkpoint(folder, head="regression")
    model, processor = exporter.load_model_and_processor(folder)
    path = exporter.export_onnx(model, processor, tmp_path / "model.onnx")
    assert [output.name for output in onnx.load(str(path)).graph.output] == ["predicted_depth"]
    estimator = OnnxDepthEstimator(path)
    assert not estimator.has_uncertainty and set(estimator.estimate(str(picture))) == {"predicted_depth"}


def test_model_card_refuses_a_malformed_uncertainty_section(tmp_path):
    from conversion.model_card import ModelCardError, load_metrics, results_section

    metrics = {key: 0.5 for key in ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")}
    metrics.update(num_images=25, uncertainty={"ause": {"abs_rel": float("nan")}, "ause_random": {"abs_rel": 0.1}})
    with pytest.raises(ModelCardError, match="uncertainty must hold 'ause' and 'ause_random'"):
        load_metrics(metrics)
    metrics["uncertainty"]["ause"]["abs_rel"] = 0.05
    assert "| AbsRel | 0.0500 | 0.1000 |" in results_section(load_metrics(metrics))


def test_flip_averaging_averages_the_uncertainty_like_the_depth():
    from modeling_moa_depthclip.evaluation import predict_depth

    model, processor = tiny_model(), tiny_processor()
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, size=(48, 64, 3), dtype=np.uint8))
    depths, uncertainties = predict_depth(model, processor, [image], [(48, 64)], flip_average=True,
                                          return_uncertainty=True)  # fmt: skip
    pixel_values = processor([image], return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        direct = model(pixel_values=pixel_values).depth_uncertainty
        flipped = model(pixel_values=torch.flip(pixel_values, dims=[-1])).depth_uncertainty
    averaged = 0.5 * (direct + torch.flip(flipped, dims=[-1]))
    expected = torch.nn.functional.interpolate(averaged[:, None], size=(48, 64), mode="bilinear")[0, 0].numpy()
    np.testing.assert_allclose(uncertainties[0], expected, **FP32)
    assert depths[0].shape == (48, 64)
