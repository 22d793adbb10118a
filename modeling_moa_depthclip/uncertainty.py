"""Per-pixel uncertainty of a binned depth head: the standard deviation of its bin distribution, in metres.

A head that classifies depth into bins (the hybrid and classification heads' `num_depth_bins` bins, the zero-shot
DepthCLIP head's prompt depths) predicts, for every pixel, a probability `p_k` for each bin centre `c_k`. Its
expected depth is `mu = sum_k p_k c_k`; the spread of that distribution,
`sigma = sqrt(sum_k p_k (c_k - mu)^2)`, is large where the head hesitates between near and far (edges, glass,
far walls) and near zero where one bin takes all the mass. It costs one more weighted sum over the bins.
"""

import torch


def bin_distribution_std(probs: torch.Tensor, centers: torch.Tensor, dim: int = 1) -> torch.Tensor:
    """Standard deviation (in the unit of `centers`, metres) of the bin distribution `probs` along `dim`.

    `probs` sums to one along `dim` (a softmax); `centers` holds one depth per bin. Two weighted sums over the bins
    (`E[s]`, `E[s^2]`) with the centres shifted to the middle of their range, `s = c - (c_min + c_max) / 2`: as fast
    as the expected depth itself (a spread-around-the-mean form materialises a bins-sized tensor three times, ~7x
    slower at 128 bins on a 120x160 grid), and the shift keeps the float32 cancellation of `E[s^2] - E[s]^2` to
    about 2 mm of standard deviation for a 0-10 m range (a fraction of a 78 mm bin).
    """
    if probs.shape[dim] != centers.numel():
        raise ValueError(f"probs has {probs.shape[dim]} bins along dim {dim}, centers has {centers.numel()}")
    centers = centers.to(device=probs.device, dtype=probs.dtype)
    shifted = centers - (centers.max() + centers.min()) / 2
    moved = probs.movedim(dim, -1)
    mean = moved @ shifted
    return (moved @ (shifted * shifted) - mean * mean).clamp_min(0.0).sqrt()


def has_depth_bins(config) -> bool:
    """Whether a model of this configuration predicts a bin distribution (every head but `"regression"`)."""
    return getattr(config, "head", None) != "regression"


__all__ = ["bin_distribution_std", "has_depth_bins"]
