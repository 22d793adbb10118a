"""Standard NYU Depth V2 evaluation: crops, per-image metrics, and an accumulator.

The definitions follow the code shared by BTS / AdaBins / DenseDepth so numbers are comparable
with published NYU results: metrics are computed per image inside the valid mask and then
averaged over images (not over pixels).
"""

from __future__ import annotations

import hashlib
import math
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch

METRIC_KEYS: tuple[str, ...] = ("d1", "d2", "d3", "abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog")
CROPS: tuple[str, ...] = ("eigen", "garg", "none")  # the evaluation crops by name ("none": the whole frame)

# Metrics where larger is better; all others are errors.
HIGHER_IS_BETTER: frozenset[str] = frozenset({"d1", "d2", "d3"})

# Eigen crop as defined on the 480x640 NYU frames (rows 45:471, cols 41:601).
_EIGEN_CROP_480x640 = (45, 471, 41, 601)
# Garg crop fractions of (H, H, W, W), as used by the common NYU/KITTI evaluation code.
_GARG_CROP_FRACTIONS = (0.40810811, 0.99189189, 0.03594771, 0.96405229)


def _round_half_up(value: float) -> int:
    # Python's round() is banker's rounding; half-up keeps scaled crops monotone in the size.
    return int(math.floor(value + 0.5))


def eigen_crop_mask(height: int, width: int) -> np.ndarray:
    """Boolean [H, W] mask of the Eigen evaluation crop.

    Exactly rows 45:471 and columns 41:601 at 480x640; for other sizes the bounds are scaled
    proportionally (rounded half up).
    """
    top, bottom, left, right = _EIGEN_CROP_480x640
    mask = np.zeros((height, width), dtype=bool)
    mask[
        _round_half_up(top * height / 480) : _round_half_up(bottom * height / 480),
        _round_half_up(left * width / 640) : _round_half_up(right * width / 640),
    ] = True
    return mask


def garg_crop_mask(height: int, width: int) -> np.ndarray:
    """Boolean [H, W] mask of the Garg crop (fractions 0.408..0.992 of H, 0.036..0.964 of W)."""
    top, bottom, left, right = _GARG_CROP_FRACTIONS
    # Truncation (astype int) matches the reference implementation.
    rows = (int(top * height), int(bottom * height))
    cols = (int(left * width), int(right * width))
    mask = np.zeros((height, width), dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def _as_float64_array(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _crop_mask(crop: Any, shape: tuple[int, int]) -> np.ndarray | None:
    if crop is None or (isinstance(crop, str) and crop == "none"):
        return None
    if isinstance(crop, str):
        if crop == "eigen":
            return eigen_crop_mask(*shape)
        if crop == "garg":
            return garg_crop_mask(*shape)
        raise ValueError(f"unknown crop {crop!r}; expected one of {list(CROPS)}, None or a boolean mask")
    mask = np.asarray(crop, dtype=bool)
    if mask.shape != shape:
        raise ValueError(f"crop mask shape {mask.shape} does not match ground truth shape {shape}")
    return mask


class NoValidDepthError(ValueError):
    """A ground-truth depth map without a single valid pixel (in range, finite, inside the crop)."""


def evaluation_pixels(
    pred: Any, gt: Any, min_depth: float, max_depth: float, crop: str | np.ndarray | None = "eigen"
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pixels the metrics score: `(prediction, ground truth, valid mask)`, the first two float64 at the valid
    pixels only, the mask `[H, W]` at the ground truth's size. See :func:`compute_depth_metrics` for the rules."""
    pred_np = _as_float64_array(pred)
    gt_np = _as_float64_array(gt)
    if pred_np.ndim != 2 or gt_np.ndim != 2:
        raise ValueError(
            f"pred and gt must be 2-D [H, W] depth maps, got pred {tuple(pred_np.shape)} and gt {tuple(gt_np.shape)}"
        )
    if pred_np.shape != gt_np.shape:
        pred_np = (
            torch.nn.functional.interpolate(
                torch.from_numpy(pred_np)[None, None], size=gt_np.shape, mode="bilinear", align_corners=False
            )[0, 0]
            .numpy()
        )

    # A NaN/inf prediction must count as a (bad) prediction, not silently drop the pixel.
    pred_np = np.nan_to_num(pred_np, nan=min_depth, posinf=max_depth, neginf=min_depth)
    pred_np = np.clip(pred_np, min_depth, max_depth)

    with np.errstate(invalid="ignore"):
        valid = np.isfinite(gt_np) & (gt_np > min_depth) & (gt_np <= max_depth)
    crop_mask = _crop_mask(crop, gt_np.shape)
    if crop_mask is not None:
        valid &= crop_mask
    if not valid.any():
        raise NoValidDepthError(
            f"no valid ground-truth pixel in a {gt_np.shape} depth map "
            f"(range ({min_depth}, {max_depth}], crop={crop if isinstance(crop, str) or crop is None else 'mask'})"
        )

    return pred_np[valid], gt_np[valid], valid


def compute_depth_metrics(
    pred: Any,
    gt: Any,
    min_depth: float,
    max_depth: float,
    crop: str | np.ndarray | None = "eigen",
) -> dict[str, float]:
    """Standard monocular depth metrics for one image.

    Args:
        pred: predicted depth in metres, [H', W'] (NumPy array or torch tensor). Resized
            bilinearly to the ground-truth size if it differs.
        gt: ground-truth depth in metres, [H, W]; values outside (min_depth, max_depth] or
            non-finite are ignored.
        min_depth, max_depth: evaluation range, the model's (``model.config.min_depth``/``max_depth``); the
            prediction is clamped to it.
        crop: ``"eigen"``, ``"garg"``, ``None`` or a boolean [H, W] mask.

    Returns:
        Dict with exactly the keys of :data:`METRIC_KEYS` (Python floats). ``silog`` is the
        BTS/AdaBins definition ``sqrt(mean(d^2) - mean(d)^2) * 100`` with
        ``d = log(pred) - log(gt)``.

    Raises:
        ValueError: if ``pred`` or ``gt`` is not 2-D; :class:`NoValidDepthError` (a ``ValueError``) if no pixel
            is valid.
    """
    p, g, _ = evaluation_pixels(pred, gt, min_depth, max_depth, crop)
    ratio = np.maximum(g / p, p / g)
    log_diff = np.log(p) - np.log(g)
    diff = g - p
    # Clamp at 0: for a constant log ratio the two means cancel and rounding can go slightly negative.
    silog_var = max(float(np.mean(log_diff**2) - np.mean(log_diff) ** 2), 0.0)
    return {
        "d1": float(np.mean(ratio < 1.25)),
        "d2": float(np.mean(ratio < 1.25**2)),
        "d3": float(np.mean(ratio < 1.25**3)),
        "abs_rel": float(np.mean(np.abs(diff) / g)),
        "sq_rel": float(np.mean(diff**2 / g)),
        "rmse": float(np.sqrt(np.mean(diff**2))),
        "rmse_log": float(np.sqrt(np.mean(log_diff**2))),
        "log10": float(np.mean(np.abs(np.log10(g) - np.log10(p)))),
        "silog": float(np.sqrt(silog_var) * 100.0),
    }


# Frame ids must survive a float64 tensor round trip (e.g. accelerate's gather), so keep 52 bits.
_ID_BITS = 52


def _frame_id(name: str) -> int:
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << _ID_BITS) - 1)


class DepthMetricsAccumulator:
    """Accumulates per-image depth metrics and averages them over images.

    Frames are keyed by name: a frame already seen (locally or via :meth:`merge`) is never
    counted again, which makes results gathered from several processes safe even when a
    distributed sampler pads the last batch with repeated frames.

    Distributed use (either way works)::

        # object gather
        states = accelerate.utils.gather_object(acc.state())
        total = DepthMetricsAccumulator(min_depth, max_depth).merge(states)
        # tensor gather (float64, one row per frame; NaN rows from padding are ignored)
        total = DepthMetricsAccumulator.from_tensor(accelerator.gather(acc.to_tensor(device)), min_depth=min_depth,
                                                    max_depth=max_depth)
    """

    def __init__(self, min_depth: float, max_depth: float, crop: str | np.ndarray | None = "eigen"):
        self.min_depth = min_depth
        self.max_depth = max_depth
        self.crop = crop
        self._records: list[tuple[int, str, dict[str, float]]] = []
        self._ids: set[int] = set()

    def __len__(self) -> int:
        return len(self._records)

    def _add(self, frame_id: int, name: str, metrics: Mapping[str, float]) -> bool:
        if frame_id in self._ids:
            return False
        self._ids.add(frame_id)
        self._records.append((frame_id, name, {k: float(metrics[k]) for k in METRIC_KEYS}))
        return True

    def update(
        self, pred: Any, gt: Any, name: str | Sequence[str] | None = None
    ) -> dict[str, float] | list[dict[str, float]]:
        """Evaluate one image ([H, W]) or a batch ([B, H, W] / [B, 1, H, W]) and store the result.

        ``name`` identifies the frame (a list of names for a batch). Unnamed frames get a
        process-local name and are therefore never deduplicated across processes. A frame whose
        name was already seen is evaluated but not counted again.
        Returns the metrics of the image (a list for a batch).
        """
        pred_np, gt_np = _as_float64_array(pred), _as_float64_array(gt)
        if gt_np.ndim == 2 and pred_np.ndim == 2:
            names = [name] if name is None or isinstance(name, str) else list(name)
            batch = [(pred_np, gt_np)]
            single = True
        else:
            if pred_np.ndim == 4 and pred_np.shape[1] == 1:
                pred_np = pred_np[:, 0]
            if gt_np.ndim == 4 and gt_np.shape[1] == 1:
                gt_np = gt_np[:, 0]
            if pred_np.ndim != 3 or gt_np.ndim != 3 or len(pred_np) != len(gt_np):
                raise ValueError(
                    f"expected [H, W] or [B, H, W] depth maps, got pred {tuple(pred_np.shape)} and gt {tuple(gt_np.shape)}"
                )
            names = [None] * len(gt_np) if name is None else ([name] if isinstance(name, str) else list(name))
            if len(names) != len(gt_np):
                raise ValueError(f"got {len(names)} names for a batch of {len(gt_np)} images")
            batch = list(zip(pred_np, gt_np))
            single = False
        results = []
        for (p, g), n in zip(batch, names):
            metrics = compute_depth_metrics(p, g, self.min_depth, self.max_depth, self.crop)
            if n is None:
                n = f"<unnamed-{id(self):x}-{len(self._records)}>"
            self._add(_frame_id(n), n, metrics)
            results.append(metrics)
        return results[0] if single else results

    def add(self, metrics: Mapping[str, float], name: str) -> bool:
        """Add precomputed per-image metrics; returns False if the frame was already counted."""
        return self._add(_frame_id(name), name, metrics)

    @property
    def per_image(self) -> list[dict[str, Any]]:
        """Per-image results in insertion order, each ``{"name": ..., <metric>: ...}``."""
        return [{"name": name, **metrics} for _, name, metrics in self._records]

    def compute(self) -> dict[str, float]:
        """Mean of every metric over the accumulated images (keys of :data:`METRIC_KEYS`)."""
        if not self._records:
            raise ValueError("no images accumulated; cannot compute depth metrics")
        return {k: float(np.mean([m[k] for _, _, m in self._records])) for k in METRIC_KEYS}

    def reset(self) -> None:
        self._records.clear()
        self._ids.clear()

    # --- combining results from several processes -------------------------------------------

    def state(self) -> list[dict[str, Any]]:
        """Picklable per-image records (with a stable frame ``id``) for ``gather_object``."""
        return [{"name": name, "id": frame_id, **metrics} for frame_id, name, metrics in self._records]

    def to_tensor(self, device: torch.device | str | None = None) -> torch.Tensor:
        """Float64 tensor [N, 1 + len(METRIC_KEYS)]: column 0 is the frame id, then the metrics.

        Pad with NaN rows if processes hold different numbers of frames; :meth:`merge` skips them.
        """
        rows = [[float(frame_id)] + [metrics[k] for k in METRIC_KEYS] for frame_id, _, metrics in self._records]
        tensor = torch.tensor(rows, dtype=torch.float64).reshape(len(rows), 1 + len(METRIC_KEYS))
        return tensor.to(device) if device is not None else tensor

    @classmethod
    def from_tensor(cls, tensor: torch.Tensor, **kwargs: Any) -> "DepthMetricsAccumulator":
        """Build an accumulator from (possibly gathered and concatenated) :meth:`to_tensor` output."""
        return cls(**kwargs).merge(tensor)

    def merge(self, other: Any) -> "DepthMetricsAccumulator":
        """Add frames from another accumulator, a :meth:`to_tensor` tensor, or :meth:`state` records.

        ``other`` may also be a list of those (e.g. the output of ``gather_object``). Frames
        already present are skipped. Returns ``self``.
        """
        if isinstance(other, DepthMetricsAccumulator):
            for frame_id, name, metrics in other._records:
                self._add(frame_id, name, metrics)
        elif isinstance(other, torch.Tensor):
            table = other.detach().to("cpu", torch.float64).reshape(-1, 1 + len(METRIC_KEYS)).numpy()
            for row in table:
                if not np.all(np.isfinite(row)):
                    continue  # padding row
                frame_id = int(row[0])
                self._add(frame_id, f"#{frame_id:013x}", dict(zip(METRIC_KEYS, row[1:].tolist())))
        elif isinstance(other, Mapping):
            name = str(other["name"])
            frame_id = int(other["id"]) if "id" in other else _frame_id(name)
            self._add(frame_id, name, other)
        elif isinstance(other, Iterable) and not isinstance(other, (str, bytes)):
            for item in other:
                self.merge(item)
        else:
            raise TypeError(f"cannot merge object of type {type(other).__name__} into DepthMetricsAccumulator")
        return self


def format_metrics_markdown(
    metrics: Mapping[str, Any],
    *,
    keys: Sequence[str] = METRIC_KEYS,
    precision: int = 4,
    label: str = "model",
) -> str:
    """Markdown table of metrics.

    ``metrics`` is either one result dict (one row) or a mapping ``row label -> result dict``
    (one row per entry, first column headed ``label``). Arrows mark the better direction.
    """
    rows: list[tuple[str | None, Mapping[str, Any]]]
    if metrics and all(isinstance(v, Mapping) for v in metrics.values()):
        rows = [(str(k), v) for k, v in metrics.items()]
    else:
        rows = [(None, metrics)]
    with_label = rows[0][0] is not None if rows else False

    def cell(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, (float, np.floating)):
            return f"{value:.{precision}f}"
        return str(value)

    header = [f"{k} {'↑' if k in HIGHER_IS_BETTER else '↓'}" for k in keys]
    align = ["---:"] * len(keys)
    if with_label:
        header, align = [label] + header, [":---"] + align
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    for row_label, values in rows:
        cells = [cell(values.get(k)) for k in keys]
        if with_label:
            cells = [row_label] + cells
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
