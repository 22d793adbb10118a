"""The composite depth loss of MoA-DepthCLIP: `DepthLoss`, built from one small function per term.

Every term takes a prediction and a target in metres with a boolean `mask` of valid pixels, so that invalid
ground truth (zero, negative, NaN, outside the model's `[min_depth, max_depth]`) never contributes. A term with
no valid pixel is 0 with a gradient path, so a batch of empty frames does not produce NaN.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers.utils import ModelOutput


def valid_depth_mask(depth: torch.Tensor, max_depth: float, min_depth: float = 0.0) -> torch.Tensor:
    """Pixels with usable ground truth: finite, > `min_depth` (and > 0) and <= `max_depth`."""
    return torch.isfinite(depth) & (depth > max(min_depth, 0.0)) & (depth <= max_depth)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    count = mask.sum()
    if count == 0:
        return values.sum() * 0.0
    return torch.where(mask, values, torch.zeros_like(values)).sum() / count


def l1_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over valid pixels, metres."""
    return _masked_mean((pred - torch.where(mask, target, pred)).abs(), mask)


def silog_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, variance_focus: float = 0.85, scale: float = 10.0
) -> torch.Tensor:
    """Scale-invariant log loss (Eigen et al. 2014, as in BTS/AdaBins): `scale * sqrt(E[d^2] - lambda * E[d]^2)`."""
    safe_target = torch.where(mask, target, torch.ones_like(target))
    safe_pred = torch.where(mask, pred, torch.ones_like(pred))
    log_diff = torch.log(safe_pred.clamp_min(1e-6)) - torch.log(safe_target.clamp_min(1e-6))
    if mask.sum() == 0:
        return log_diff.sum() * 0.0
    mean = _masked_mean(log_diff, mask)
    # E[d^2] - lambda E[d]^2 written as Var(d) + (1 - lambda) E[d]^2, which does not cancel in float32
    variance = _masked_mean((log_diff - mean) ** 2, mask)
    # the clamp keeps sqrt differentiable when prediction == target up to a scale
    return scale * torch.sqrt((variance + (1.0 - variance_focus) * mean**2).clamp_min(1e-8))


def gradient_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """L1 distance between the horizontal and vertical finite differences of prediction and target.

    A difference counts only where both of its pixels are valid, so depth edges of invalid holes are not learned.
    """
    target = torch.where(mask, target, pred.detach())
    losses = []
    for dim in (-1, -2):
        size = pred.shape[dim]
        if size < 2:
            continue
        d_pred = pred.narrow(dim, 1, size - 1) - pred.narrow(dim, 0, size - 1)
        d_target = target.narrow(dim, 1, size - 1) - target.narrow(dim, 0, size - 1)
        pair_mask = mask.narrow(dim, 1, size - 1) & mask.narrow(dim, 0, size - 1)
        losses.append(_masked_mean((d_pred - d_target).abs(), pair_mask))
    if not losses:
        return pred.sum() * 0.0
    return sum(losses) / len(losses)


def ssim_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, max_depth: float, window: int = 3
) -> torch.Tensor:
    """`(1 - SSIM) / 2` on depth divided by `max_depth`, with a `window`x`window` box filter.

    Invalid target pixels are replaced by the prediction (detached) before filtering, and only windows centred on
    a valid pixel are averaged.
    """
    c1, c2 = 0.01**2, 0.03**2
    x = (pred / max_depth).unsqueeze(1)
    y = (torch.where(mask, target, pred.detach()) / max_depth).unsqueeze(1)
    pad = window // 2

    def box(t):
        return F.avg_pool2d(F.pad(t, (pad, pad, pad, pad), mode="replicate"), window, stride=1)

    mu_x, mu_y = box(x), box(y)
    sigma_x = box(x * x) - mu_x**2
    sigma_y = box(y * y) - mu_y**2
    sigma_xy = box(x * y) - mu_x * mu_y
    ssim = ((2 * mu_x * mu_y + c1) * (2 * sigma_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (sigma_x + sigma_y + c2))
    return _masked_mean(((1 - ssim) / 2).clamp(0, 1).squeeze(1), mask)


def depth_to_bin_index(depth: torch.Tensor, bin_edges: torch.Tensor) -> torch.Tensor:
    """Index of the bin whose [edge_i, edge_i+1) interval holds each depth (clamped to the first/last bin)."""
    inner_edges = bin_edges[1:-1].contiguous()
    return torch.bucketize(depth.contiguous(), inner_edges, right=True)


def bin_cross_entropy_loss(
    bin_logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, bin_edges: torch.Tensor
) -> torch.Tensor:
    """Cross-entropy of the depth-bin classifier against the bin of the target depth, valid pixels only.

    `bin_logits` is `[batch, bins, h, w]`; `target` and `mask` must already be at `h x w`
    (see `resize_depth_to_grid`).
    """
    labels = depth_to_bin_index(torch.where(mask, target, torch.zeros_like(target)), bin_edges)
    labels = torch.where(mask, labels, torch.full_like(labels, -100))
    if mask.sum() == 0:
        return bin_logits.sum() * 0.0
    return F.cross_entropy(bin_logits.float(), labels, ignore_index=-100)


def resize_depth_to_grid(depth: torch.Tensor, mask: torch.Tensor, size: tuple[int, int]):
    """Area-average the valid depth of each cell of an `h x w` grid; a cell is valid if any of its pixels is.

    Nearest sampling would pick one pixel per cell (and often an invalid one) on coarse grids like 7x7.
    """
    if tuple(depth.shape[-2:]) == tuple(size):
        return depth, mask
    weights = mask.unsqueeze(1).to(depth.dtype)
    values = torch.where(mask, depth, torch.zeros_like(depth)).unsqueeze(1)
    summed = F.adaptive_avg_pool2d(values, size)
    coverage = F.adaptive_avg_pool2d(weights, size)
    grid_mask = coverage > 0
    grid_depth = torch.where(grid_mask, summed / coverage.clamp_min(1e-12), torch.zeros_like(summed))
    return grid_depth.squeeze(1), grid_mask.squeeze(1)


def router_balance_loss(gates: torch.Tensor) -> torch.Tensor:
    """Switch-Transformer load balancing: `E * sum_e f_e * P_e`, 1.0 for perfectly even routing.

    `gates` is `[batch, tokens, experts]` (after any top-k); `f_e` is the fraction of tokens whose largest gate is
    expert `e`, `P_e` the mean gate of `e`.
    """
    num_experts = gates.shape[-1]
    flat = gates.reshape(-1, num_experts).float()
    dispatch = F.one_hot(flat.argmax(-1), num_experts).float().mean(0)
    return num_experts * (dispatch * flat.mean(0)).sum()


def router_entropy_loss(gates: torch.Tensor) -> torch.Tensor:
    """Mean per-token entropy of the gate distribution (lower means more decisive routing)."""
    p = gates.float().clamp_min(1e-9)
    return -(p * p.log()).sum(-1).mean()


def depth_bin_edges(config, device=None, dtype=torch.float32) -> torch.Tensor:
    """`num_depth_bins + 1` bin edges between `config.min_depth` and `config.max_depth`, linear or log spaced."""
    n = config.num_depth_bins
    if config.bin_spacing == "log":
        return torch.exp(
            torch.linspace(math.log(config.min_depth), math.log(config.max_depth), n + 1, device=device)
        ).to(dtype)
    return torch.linspace(config.min_depth, config.max_depth, n + 1, device=device).to(dtype)


def depth_bin_centers(config, device=None, dtype=torch.float32) -> torch.Tensor:
    """Centre of each bin of `depth_bin_edges`: geometric for log spacing, arithmetic for linear."""
    edges = depth_bin_edges(config, device=device, dtype=torch.float32)
    if config.bin_spacing == "log":
        centers = torch.sqrt(edges[:-1] * edges[1:])
    else:
        centers = (edges[:-1] + edges[1:]) / 2
    return centers.to(dtype)


@dataclass
class DepthLossOutput(ModelOutput):
    r"""
    loss (`torch.FloatTensor`): `sum_k loss_weights[k] * components[k]` plus `router_aux_loss_coef * router_aux_loss`.
    components (`dict[str, torch.FloatTensor]`): Each unweighted term, detached, and `router_aux`.
    router_aux_loss (`torch.FloatTensor`): The auxiliary router loss, unweighted, with its graph.
    valid_mask (`torch.BoolTensor` of shape `(batch_size, height, width)`):
        The label pixels the loss supervised: finite and within `[config.min_depth, config.max_depth]`.
    """

    loss: torch.FloatTensor | None = None
    components: dict | None = None
    router_aux_loss: torch.FloatTensor | None = None
    valid_mask: torch.BoolTensor | None = None


class DepthLoss:
    """The training objective of a MoA-DepthCLIP configuration, every setting read from that configuration.

    - valid pixels: `valid_depth_mask` with `config.min_depth` / `config.max_depth`;
    - `bin_ce` on the head's grid against `depth_bin_edges(config)`, after `resize_depth_to_grid`;
    - `l1`, `silog` (variance focus `config.silog_lambda`), `gradient` and `ssim` (scaled by `config.max_depth`) on
      the prediction at the labels' resolution;
    - each weighted by `config.loss_weights`, plus `config.router_aux_loss_coef` times the `config.router_aux_loss`
      term (averaged over the MoA layers).
    """

    def __init__(self, config):
        self.config = config

    def valid_mask(self, labels: torch.Tensor) -> torch.Tensor:
        return valid_depth_mask(labels, self.config.max_depth, self.config.min_depth)

    def router_aux_loss(self, gates_per_layer) -> torch.Tensor:
        if not gates_per_layer:  # no Mixture-of-Adapters
            return torch.zeros(())
        term = router_entropy_loss if self.config.router_aux_loss == "entropy" else router_balance_loss
        return torch.stack([term(gates) for gates in gates_per_layer]).mean()

    def __call__(self, predicted_depth, bin_logits, labels, gates_per_layer) -> DepthLossOutput:
        """`predicted_depth` `[batch, H, W]` in metres, `bin_logits` `[batch, bins, h, w]` (None for a head without
        the bin classifier: no `bin_ce` term), `labels` `[batch, H', W']` (or `[batch, 1, H', W']`) in metres,
        `gates_per_layer` the router gates `[batch, tokens, experts]` of each MoA layer (none: no router term)."""
        config = self.config
        if labels.dim() == 4 and labels.shape[1] == 1:
            labels = labels.squeeze(1)
        if labels.dim() != 3 or labels.shape[0] != predicted_depth.shape[0]:
            raise ValueError(
                f"labels of shape {tuple(labels.shape)} cannot match predicted_depth of shape "
                f"{tuple(predicted_depth.shape)}: expected (batch={predicted_depth.shape[0]}, height, width)"
            )
        labels = labels.to(device=predicted_depth.device, dtype=torch.float32)
        prediction = predicted_depth.float()
        if prediction.shape[-2:] != labels.shape[-2:]:
            prediction = F.interpolate(prediction.unsqueeze(1), size=labels.shape[-2:], mode="bilinear").squeeze(1)
        mask = self.valid_mask(labels)

        terms = {}
        if bin_logits is not None:
            grid_depth, grid_mask = resize_depth_to_grid(labels, mask, tuple(bin_logits.shape[-2:]))
            terms["bin_ce"] = bin_cross_entropy_loss(
                bin_logits, grid_depth, grid_mask, depth_bin_edges(config, device=labels.device)
            )
        terms.update({
            "l1": l1_loss(prediction, labels, mask),
            "silog": silog_loss(prediction, labels, mask, variance_focus=config.silog_lambda),
            "gradient": gradient_loss(prediction, labels, mask),
            "ssim": ssim_loss(prediction, labels, mask, max_depth=config.max_depth),
        })  # fmt: skip
        router_aux = self.router_aux_loss(gates_per_layer)
        loss = sum(config.loss_weights[name] * value for name, value in terms.items())
        if gates_per_layer and config.router_aux_loss_coef > 0:  # models without routers have no such setting
            loss = loss + config.router_aux_loss_coef * router_aux
        components = {name: value.detach() for name, value in terms.items()}
        components["router_aux"] = router_aux.detach()
        return DepthLossOutput(loss=loss, components=components, router_aux_loss=router_aux, valid_mask=mask)
