"""How good a per-pixel depth uncertainty is, evaluated as the field does: sparsification curves and AUSE.

For one image and one error metric (AbsRel, RMSE), the valid pixels of the standard protocol (`evaluation_pixels`:
same clamp, range and crop as the depth metrics) are removed in steps, the most uncertain first, and the metric is
recomputed on the pixels that remain: the *sparsification curve*. A useful uncertainty removes the worst pixels first,
so the curve falls. The *oracle* curve removes pixels by their true error for that metric (|error| / depth for
AbsRel, |error| for RMSE): no ranking falls faster. The *random* curve removes pixels in a seeded random order: it
stays flat on average, the level of an uninformative uncertainty.

* AUSE (area under the sparsification error) = area between the uncertainty curve and the oracle curve, trapezoid rule
  over the removed fraction (0, 0.05, ..., 0.95); 0 is a perfect ranking, lower is better.
* AUSE of the random order = the same area for the random curve: the figure an uninformative uncertainty gets.
* AURG (area under the random gain) = area between the random curve and the uncertainty curve; positive means
  better than random.

Curves are in the metric's own unit (AbsRel unitless, RMSE in metres), computed per image and then averaged over
images, like the depth metrics (Poggi et al., "On the uncertainty of self-supervised monocular depth estimation",
CVPR 2020; Ilg et al., ECCV 2018).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch

from .metrics import _frame_id, evaluation_pixels


SPARSIFICATION_FRACTIONS: tuple[float, ...] = tuple(round(0.05 * step, 2) for step in range(20))
UNCERTAINTY_METRICS: tuple[str, ...] = ("abs_rel", "rmse")
ORDERS: tuple[str, ...] = ("uncertainty", "oracle", "random")
METRIC_LABELS = {"abs_rel": "AbsRel", "rmse": "RMSE (m)"}

__all__ = [
    "ORDERS",
    "SPARSIFICATION_FRACTIONS",
    "UNCERTAINTY_METRICS",
    "SparsificationAccumulator",
    "ause",
    "format_uncertainty_markdown",
    "image_sparsification",
    "plot_sparsification",
    "sparsification_curve",
]


def _pixel_errors(pred: np.ndarray, gt: np.ndarray, metric: str) -> np.ndarray:
    """Each pixel's share of the metric: |error| / depth for AbsRel, error^2 for RMSE (the mean before the root)."""
    if metric == "abs_rel":
        return np.abs(gt - pred) / gt
    if metric == "rmse":
        return (gt - pred) ** 2
    raise ValueError(f"unknown sparsification metric {metric!r}; expected one of {list(UNCERTAINTY_METRICS)}")


def sparsification_curve(
    errors: np.ndarray, removal_order: np.ndarray, metric: str, fractions: Iterable[float] = SPARSIFICATION_FRACTIONS
) -> np.ndarray:
    """The metric on the pixels left after removing `floor(f * n)` pixels in `removal_order`, for each fraction `f`.

    `errors` are the per-pixel terms of `_pixel_errors`; `removal_order` indexes them, first removed first.
    """
    ordered = np.asarray(errors, dtype=np.float64)[np.asarray(removal_order)]
    count = ordered.size
    if count == 0:
        raise ValueError("no pixel to sparsify")
    # remaining[k] = sum of the errors still there after removing the first k pixels
    remaining = np.cumsum(ordered[::-1])[::-1]
    removed = np.array([min(int(np.floor(f * count + 1e-9)), count - 1) for f in fractions])
    means = remaining[removed] / (count - removed)
    return np.sqrt(means) if metric == "rmse" else means


def ause(curve: np.ndarray, oracle: np.ndarray, fractions: Iterable[float] = SPARSIFICATION_FRACTIONS) -> float:
    """Area between a sparsification curve and the oracle's, trapezoid rule over the removed fraction."""
    difference = np.asarray(curve, dtype=np.float64) - np.asarray(oracle, dtype=np.float64)
    x = np.asarray(list(fractions), dtype=np.float64)
    return float(np.sum((difference[1:] + difference[:-1]) * np.diff(x)) / 2.0)


def image_sparsification(
    pred: Any,
    gt: Any,
    uncertainty: Any,
    *,
    min_depth: float,
    max_depth: float,
    crop: str | np.ndarray | None = "eigen",
    rng: np.random.Generator,
    fractions: Iterable[float] = SPARSIFICATION_FRACTIONS,
    metrics: Iterable[str] = UNCERTAINTY_METRICS,
) -> dict[str, dict[str, np.ndarray]]:
    """`{metric: {"uncertainty" | "oracle" | "random": curve}}` of one image on the protocol's valid pixels.

    `uncertainty` must have the ground truth's size (resize it like the prediction). Ties in the uncertainty keep
    the pixels' raster order (a stable sort), so a constant uncertainty ranks like the random order would on average.

    Raises `NoValidDepthError` (a `ValueError`) if the image has no valid pixel, like `compute_depth_metrics`.
    """
    fractions = list(fractions)
    p, g, valid = evaluation_pixels(pred, gt, min_depth, max_depth, crop)
    u = np.asarray(uncertainty.detach().cpu() if isinstance(uncertainty, torch.Tensor) else uncertainty, np.float64)
    if u.shape != valid.shape:
        raise ValueError(f"uncertainty of shape {u.shape} does not match the ground truth's {valid.shape}")
    u = np.nan_to_num(u[valid], nan=np.inf)  # an undefined uncertainty counts as the least trusted
    by_uncertainty = np.argsort(-u, kind="stable")
    random_order = rng.permutation(p.size)
    curves = {}
    for metric in metrics:
        errors = _pixel_errors(p, g, metric)
        orders = {
            "uncertainty": by_uncertainty,
            "oracle": np.argsort(-errors, kind="stable"),
            "random": random_order,
        }
        curves[metric] = {
            name: sparsification_curve(errors, order, metric, fractions) for name, order in orders.items()
        }
    return curves


class SparsificationAccumulator:
    """Per-image sparsification curves, keyed by frame name (a repeated frame counts once), averaged over images.

    `state()` and `merge()` carry the records between processes (`accelerate.utils.gather_object`), like
    `DepthMetricsAccumulator`. The random order of a frame is seeded by `seed` and the frame's name, so it does not
    depend on the batch or the process that scored the frame.
    """

    def __init__(
        self,
        min_depth: float,
        max_depth: float,
        crop: str | np.ndarray | None = "eigen",
        seed: int = 0,
        fractions: Iterable[float] = SPARSIFICATION_FRACTIONS,
        metrics: Iterable[str] = UNCERTAINTY_METRICS,
    ):
        self.min_depth, self.max_depth, self.crop, self.seed = min_depth, max_depth, crop, seed
        self.fractions = tuple(float(f) for f in fractions)
        self.metrics = tuple(metrics)
        self._records: dict[str, dict[str, dict[str, list[float]]]] = {}

    def __len__(self) -> int:
        return len(self._records)

    def update(self, pred: Any, gt: Any, uncertainty: Any, name: str) -> bool:
        """Score one frame; returns False (and scores nothing) if its name was already counted."""
        name = str(name)
        if name in self._records:
            return False
        rng = np.random.default_rng([self.seed, _frame_id(name)])
        curves = image_sparsification(
            pred, gt, uncertainty, min_depth=self.min_depth, max_depth=self.max_depth, crop=self.crop, rng=rng,
            fractions=self.fractions, metrics=self.metrics,
        )  # fmt: skip
        self._records[name] = {m: {o: c.tolist() for o, c in by_order.items()} for m, by_order in curves.items()}
        return True

    def state(self) -> list[dict[str, Any]]:
        return [{"name": name, "curves": curves} for name, curves in self._records.items()]

    def merge(self, other: Any) -> "SparsificationAccumulator":
        """Add the frames of another accumulator or of `state()` records (or lists of them) not yet counted."""
        if isinstance(other, SparsificationAccumulator):
            other = other.state()
        if isinstance(other, Mapping):
            self._records.setdefault(str(other["name"]), other["curves"])
        else:
            for item in other:
                self.merge(item)
        return self

    def compute(self) -> dict[str, Any]:
        """Mean curves over images, AUSE, the random order's AUSE and AURG per metric, and how they were made."""
        if not self._records:
            raise ValueError("no images accumulated; cannot compute sparsification curves")
        records = [self._records[name] for name in sorted(self._records)]
        curves = {
            metric: {order: np.mean([r[metric][order] for r in records], axis=0).tolist() for order in ORDERS}
            for metric in self.metrics
        }
        # the trapezoid area is linear in the curve: the area of the mean curve is the mean of the per-image areas
        return {
            "fractions": list(self.fractions),
            "curves": curves,
            "ause": {m: ause(c["uncertainty"], c["oracle"], self.fractions) for m, c in curves.items()},
            "ause_random": {m: ause(c["random"], c["oracle"], self.fractions) for m, c in curves.items()},
            "aurg": {m: ause(c["random"], c["uncertainty"], self.fractions) for m, c in curves.items()},
            "num_images": len(records),
            "random_seed": self.seed,
            "uncertainty": "standard deviation of the per-pixel depth-bin distribution (m)",
            "averaging": "per image, then averaged over images; trapezoid rule over the removed fraction",
        }


def format_uncertainty_markdown(summary: Mapping[str, Any], precision: int = 4) -> str:
    """The AUSE table: per metric, AUSE of the uncertainty, of the random order, and AURG."""
    fractions = summary["fractions"]
    lines = [
        "## Uncertainty (sparsification)",
        "",
        "| metric | AUSE ↓ | AUSE of a random order | AURG ↑ | metric at 0% removed | oracle at "
        f"{fractions[-1]:.0%} removed |",
        "| :--- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for metric, curves in summary["curves"].items():
        lines.append(
            f"| {METRIC_LABELS.get(metric, metric)} | {summary['ause'][metric]:.{precision}f} | "
            f"{summary['ause_random'][metric]:.{precision}f} | {summary['aurg'][metric]:.{precision}f} | "
            f"{curves['uncertainty'][0]:.{precision}f} | {curves['oracle'][-1]:.{precision}f} |"
        )
    lines += [
        "",
        f"- uncertainty: {summary['uncertainty']}; pixels removed most uncertain first in steps of "
        f"{fractions[1] - fractions[0]:.0%} from 0% to {fractions[-1]:.0%}; oracle: removed by true error; random: "
        f"seeded order (seed {summary['random_seed']})",
        f"- AUSE: area between the uncertainty and oracle curves; AURG: between the random and uncertainty curves; "
        f"{summary['averaging']}; {summary['num_images']} images",
        "",
    ]
    return "\n".join(lines)


def plot_sparsification(summary: Mapping[str, Any], path: str | os.PathLike, title: str | None = None) -> Path:
    """The sparsification curves (uncertainty, oracle, random) of each metric side by side, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = list(summary["curves"])
    fractions = np.asarray(summary["fractions"]) * 100.0
    fig, axes = plt.subplots(1, len(metrics), figsize=(5.5 * len(metrics), 4.2), constrained_layout=True, squeeze=False)
    styles = {"uncertainty": ("tab:blue", "-"), "oracle": ("tab:green", "--"), "random": ("tab:grey", ":")}
    for ax, metric in zip(axes[0], metrics):
        for order, (colour, line) in styles.items():
            label = {"uncertainty": f"bin std (AUSE {summary['ause'][metric]:.4f})",
                     "oracle": "oracle (true error)",
                     "random": f"random (AUSE {summary['ause_random'][metric]:.4f})"}[order]  # fmt: skip
            ax.plot(fractions, summary["curves"][metric][order], line, color=colour, marker=".", label=label)
        ax.set_xlabel("pixels removed (%)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric) + " of the remaining pixels")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(title or f"Sparsification curves ({summary['num_images']} images)")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
