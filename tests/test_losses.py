import math

import pytest
import torch

from modeling_moa_depthclip.losses import (
    bin_cross_entropy_loss,
    depth_to_bin_index,
    gradient_loss,
    l1_loss,
    resize_depth_to_grid,
    router_balance_loss,
    router_entropy_loss,
    silog_loss,
    ssim_loss,
    valid_depth_mask,
)


@pytest.fixture
def scene():
    torch.manual_seed(0)
    target = 1.0 + 4.0 * torch.rand(2, 16, 20)
    mask = torch.ones_like(target, dtype=torch.bool)
    return target, mask


def test_valid_mask_drops_zero_negative_nan_inf_and_beyond_max():
    depth = torch.tensor([[0.0, -1.0, float("nan"), float("inf"), 10.5, 3.0, 10.0]])
    assert valid_depth_mask(depth, max_depth=10.0).tolist() == [[False, False, False, False, False, True, True]]


@pytest.mark.parametrize("loss", ["l1", "silog", "gradient", "ssim"])
def test_each_term_is_zero_for_a_perfect_prediction_and_positive_otherwise(scene, loss):
    target, mask = scene
    fn = {
        "l1": l1_loss,
        "silog": silog_loss,
        "gradient": gradient_loss,
        "ssim": lambda p, t, m: ssim_loss(p, t, m, max_depth=10.0),
    }[loss]
    assert fn(target.clone(), target, mask).item() == pytest.approx(0.0, abs=2e-3)
    noisy = target + 0.5 * torch.randn_like(target)
    assert fn(noisy.clamp_min(0.1), target, mask).item() > 0.01


def test_l1_value_and_invalid_pixels_ignored():
    target = torch.tensor([[[1.0, 2.0, 0.0, float("nan")]]])
    pred = torch.tensor([[[1.5, 1.0, 7.0, 9.0]]])
    mask = valid_depth_mask(target, 10.0)
    assert l1_loss(pred, target, mask).item() == pytest.approx((0.5 + 1.0) / 2)


def test_silog_of_a_known_case():
    # log differences d = [log 2, 0]: sqrt(mean(d^2) - 0.85 mean(d)^2) * 10
    target = torch.tensor([[[1.0, 3.0]]])
    pred = torch.tensor([[[2.0, 3.0]]])
    mask = torch.ones_like(target, dtype=torch.bool)
    d = [math.log(2.0), 0.0]
    expected = 10 * math.sqrt((d[0] ** 2 + d[1] ** 2) / 2 - 0.85 * ((d[0] + d[1]) / 2) ** 2)
    assert silog_loss(pred, target, mask).item() == pytest.approx(expected, rel=1e-5)


def test_silog_with_lambda_one_is_scale_invariant(scene):
    target, mask = scene
    assert silog_loss(target * 1.7, target, mask, variance_focus=1.0).item() == pytest.approx(0.0, abs=2e-3)
    assert silog_loss(target * 1.7, target, mask, variance_focus=0.85).item() > 1.0


def test_terms_ignore_invalid_pixels_whatever_the_prediction_there(scene):
    target, mask = scene
    target = target.clone()
    target[:, :4] = 0.0
    target[:, 4, :5] = float("nan")
    mask = valid_depth_mask(target, 10.0)
    pred = torch.where(mask, target, torch.full_like(target, 9.0))
    assert l1_loss(pred, target, mask).item() == 0.0
    assert silog_loss(pred, target, mask).item() == pytest.approx(0.0, abs=2e-3)
    assert gradient_loss(pred, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert ssim_loss(pred, target, mask, max_depth=10.0).item() == pytest.approx(0.0, abs=1e-4)


def test_all_invalid_gives_zero_with_a_gradient_not_nan():
    target = torch.zeros(1, 8, 8)
    mask = valid_depth_mask(target, 10.0)
    pred = torch.full((1, 8, 8), 2.0, requires_grad=True)
    total = l1_loss(pred, target, mask) + silog_loss(pred, target, mask) + gradient_loss(pred, target, mask)
    total = total + ssim_loss(pred, target, mask, max_depth=10.0)
    total.backward()
    assert total.item() == 0.0 and torch.isfinite(pred.grad).all()


def test_gradient_loss_sees_edges_and_not_offsets():
    target = torch.ones(1, 4, 6)
    target[..., 3:] = 3.0
    mask = torch.ones_like(target, dtype=torch.bool)
    assert gradient_loss(target + 1.0, target, mask).item() == pytest.approx(0.0, abs=1e-6)
    flat = torch.full_like(target, 2.0)
    # one edge of height 2 among 5 horizontal differences per row; vertical differences all agree
    assert gradient_loss(flat, target, mask).item() == pytest.approx((2.0 / 5 + 0.0) / 2)


def test_bin_index_and_cross_entropy():
    edges = torch.tensor([0.0, 1.0, 2.0, 3.0])
    depth = torch.tensor([0.5, 1.0, 2.5, 3.0, 9.0])
    assert depth_to_bin_index(depth, edges).tolist() == [0, 1, 2, 2, 2]
    target = torch.tensor([[[0.5, 2.5]]])
    mask = torch.tensor([[[True, False]]])
    logits = torch.full((1, 3, 1, 2), -20.0)
    logits[0, 0, 0, 0] = 20.0  # right bin for the valid pixel; the invalid pixel is wrong but ignored
    logits[0, 0, 0, 1] = 20.0
    assert bin_cross_entropy_loss(logits, target, mask, edges).item() == pytest.approx(0.0, abs=1e-6)
    logits[0, 0, 0, 0], logits[0, 1, 0, 0] = -20.0, 20.0
    assert bin_cross_entropy_loss(logits, target, mask, edges).item() > 10


def test_resize_depth_to_grid_averages_only_valid_pixels():
    depth = torch.tensor([[[1.0, 3.0, 0.0, 0.0], [5.0, 0.0, 0.0, 0.0]]])
    mask = depth > 0
    grid_depth, grid_mask = resize_depth_to_grid(depth, mask, (1, 2))
    assert grid_mask.tolist() == [[[True, False]]]
    assert grid_depth[0, 0, 0].item() == pytest.approx(3.0)


def test_router_losses():
    even = torch.full((2, 10, 4), 0.25)
    assert router_entropy_loss(even).item() == pytest.approx(math.log(4), rel=1e-5)
    collapsed = torch.zeros(2, 10, 4)
    collapsed[..., 0] = 1.0
    assert router_entropy_loss(collapsed).item() == pytest.approx(0.0, abs=1e-6)
    assert router_balance_loss(collapsed).item() == pytest.approx(4.0)
    balanced = torch.eye(4).repeat(2, 5, 1)[:, :20]
    assert router_balance_loss(balanced).item() == pytest.approx(1.0)


def _composite_by_hand(config, prediction, bin_logits, labels, gates_per_layer):
    """The composite loss written out term by term, from the functions of this module and the config's fields."""
    from modeling_moa_depthclip.losses import depth_bin_edges

    mask = valid_depth_mask(labels, config.max_depth, config.min_depth)
    grid_depth, grid_mask = resize_depth_to_grid(labels, mask, tuple(bin_logits.shape[-2:]))
    w = config.loss_weights
    total = (
        w["bin_ce"] * bin_cross_entropy_loss(bin_logits, grid_depth, grid_mask, depth_bin_edges(config))
        + w["l1"] * l1_loss(prediction, labels, mask)
        + w["silog"] * silog_loss(prediction, labels, mask, variance_focus=config.silog_lambda)
        + w["gradient"] * gradient_loss(prediction, labels, mask)
        + w["ssim"] * ssim_loss(prediction, labels, mask, max_depth=config.max_depth)
    )
    router = torch.stack([router_balance_loss(g) for g in gates_per_layer]).mean()
    return total + config.router_aux_loss_coef * router, mask


@pytest.mark.parametrize("max_depth", [10.0, 80.0])
def test_depth_loss_is_the_weighted_composite_on_the_configs_depth_range(max_depth):
    from modeling_moa_depthclip.losses import DepthLoss
    from tiny_models import tiny_config

    config = tiny_config(max_depth=max_depth, router_aux_loss_coef=0.3, loss_weights={"l1": 0.7})
    torch.manual_seed(0)
    labels = 60.0 * torch.rand(2, 32, 32)  # up to 60 m: beyond a 10 m model's range, within an 80 m one's
    labels[:, :3] = 0.0
    prediction = 1.0 + 5.0 * torch.rand(2, 32, 32)
    bin_logits = torch.randn(2, config.num_depth_bins, 8, 8)
    gates = [torch.rand(2, 17, config.num_experts).softmax(-1) for _ in config.moa_layers]
    out = DepthLoss(config)(prediction, bin_logits, labels, gates)
    expected, mask = _composite_by_hand(config, prediction, bin_logits, labels, gates)
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-6)
    assert torch.equal(out.valid_mask, mask)
    # what the loss supervised: on the 80 m model the labels beyond 10 m, on the 10 m model none of them
    beyond_10m = int(((labels > 10.0) & out.valid_mask).sum())
    if max_depth == 80.0:
        assert beyond_10m == int((labels > 10.0).sum()) > 0
    else:
        assert beyond_10m == 0 and int(out.valid_mask.sum()) == int(((labels > 0) & (labels <= 10.0)).sum())
    assert set(out.components) == {"bin_ce", "l1", "silog", "gradient", "ssim", "router_aux"}
    # a loss on the other range gives another value: the range is read from the config, not assumed
    other = tiny_config(max_depth=90.0 - max_depth, router_aux_loss_coef=0.3, loss_weights={"l1": 0.7})
    assert DepthLoss(other)(prediction, bin_logits, labels, gates).loss.item() != pytest.approx(out.loss.item())
