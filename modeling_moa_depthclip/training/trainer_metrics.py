"""`compute_metrics` for `transformers.Trainer` (README, "Fine-tuning with `transformers.Trainer`")."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ..evaluation.metrics import DepthMetricsAccumulator


def _strip_padding(depth: np.ndarray, padding_index: float) -> np.ndarray:
    """Drop the rows and columns Trainer filled with `padding_index` when it concatenated maps of other sizes."""
    kept = depth != padding_index
    rows, cols = np.flatnonzero(kept.any(axis=1)), np.flatnonzero(kept.any(axis=0))
    if rows.size == 0:
        return depth
    return depth[: rows[-1] + 1, : cols[-1] + 1]


class DepthMetrics:
    """`compute_metrics` for `transformers.Trainer`: the package's NYU metrics, averaged over images.

    Predictions are `predicted_depth` (the config's `keys_to_ignore_at_inference` drops every other output) and
    labels are ground-truth depth in metres; the depth range is the model config's `min_depth`/`max_depth`, the
    same range the model predicts in. `crop` is `None` (every valid pixel), `"eigen"` or `"garg"` (NYU/KITTI
    protocols, scaled to the label size). Works both ways Trainer calls it: once with every prediction, or per
    batch with `batch_eval_metrics=True` (then only the running per-image metrics are kept in memory).
    """

    def __init__(self, config, crop: str | np.ndarray | None = None, padding_index: float = -100.0):
        self.min_depth, self.max_depth = float(config.min_depth), float(config.max_depth)
        self.crop, self.padding_index = crop, padding_index
        self._accumulator = self._new_accumulator()

    def _new_accumulator(self) -> DepthMetricsAccumulator:
        return DepthMetricsAccumulator(min_depth=self.min_depth, max_depth=self.max_depth, crop=self.crop)

    def __call__(self, eval_prediction, compute_result: bool | None = None) -> dict[str, float]:
        predictions, labels = eval_prediction.predictions, eval_prediction.label_ids
        if isinstance(predictions, (tuple, list)):
            raise ValueError(
                f"expected the predictions to be the depth alone, got {len(predictions)} arrays: the model config's "
                "keys_to_ignore_at_inference should leave only predicted_depth"
            )
        if labels is None:
            raise ValueError("depth metrics need labels (ground-truth depth in metres); the eval set has none")
        predictions, labels = _as_numpy(predictions), _as_numpy(labels)
        if labels.ndim == 4 and labels.shape[1] == 1:
            labels = labels[:, 0]
        if predictions.ndim != 3 or labels.ndim != 3 or len(predictions) != len(labels):
            raise ValueError(
                f"expected predictions and labels of shape (batch, height, width), got {predictions.shape} and "
                f"{labels.shape}"
            )
        for prediction, label in zip(predictions, labels):
            self._accumulator.update(
                _strip_padding(prediction, self.padding_index), _strip_padding(label, self.padding_index)
            )
        if compute_result is False:  # a batch of `batch_eval_metrics`: results come with the last one
            return {}
        result = self._accumulator.compute()
        self._accumulator = self._new_accumulator()
        return result


def _as_numpy(array: Any) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().float().cpu().numpy()
    return np.asarray(array, dtype=np.float32)


__all__ = ["DepthMetrics"]
