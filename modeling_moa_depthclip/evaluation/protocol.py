"""Loading a depth model with its image processor, and the standard NYU Depth V2 evaluation protocol.

The protocol is the one of the BTS / AdaBins / DenseDepth NYU evaluation code:

* the model predicts at its input size (default: the image processor's), the prediction is resized bilinearly to the
  ground truth's size, optionally averaged with the prediction of the horizontally flipped image;
* predictions are clamped to `[min_depth, max_depth]`, taken from the model's config unless given; ground-truth
  pixels outside `(min_depth, max_depth]` or not finite are invalid; only the Eigen crop is scored by default;
* the metrics are computed per image on its valid pixels and then averaged over images (not over pixels). A frame
  without a single valid pixel is skipped, counted and named in the outputs.

`examples/evaluate.py` (the command line) and `examples/train.py` (periodic and final evaluation) both use
`evaluate` and `write_evaluation_outputs`; models are loaded with
`modeling_moa_depthclip.loading.load_model_and_processor`.
"""

from __future__ import annotations

import contextlib
import csv
import json
import logging
import os
import re
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from ..data import SourceKind, classify_source, load_depth_dataset
from ..uncertainty import has_depth_bins
from ..utils import first_line
from .metrics import CROPS, METRIC_KEYS, DepthMetricsAccumulator, NoValidDepthError, format_metrics_markdown
from .uncertainty import SparsificationAccumulator, format_uncertainty_markdown, plot_sparsification


logger = logging.getLogger(__name__)

__all__ = [
    "AVERAGING",
    "NYU_SAMPLE_ENV",
    "CROPS",
    "check_output_dir",
    "dataset_label",
    "EvaluationSettings",
    "depth_range",
    "evaluate",
    "format_report",
    "format_result_line",
    "load_dataset_or_error",
    "nyu_sample_dir",
    "predict_depth",
    "safe_frame_filename",
    "save_samples_panel",
    "write_evaluation_outputs",
]

NYU_SAMPLE_ENV = "MOA_DEPTHCLIP_NYU_SAMPLE"
AVERAGING = (
    "per-image: each metric is computed on the valid pixels of one image, then averaged over images "
    "(as the common BTS/AdaBins/DenseDepth NYU evaluation code does)"
)


# ------------------------------------------------------------------------------------------------
# Data sources and output folders
# ------------------------------------------------------------------------------------------------


def nyu_sample_dir(default: str | os.PathLike | None = None) -> Path | None:
    """A folder of NYU frames (with its `index.csv`) to evaluate on by default: `$MOA_DEPTHCLIP_NYU_SAMPLE` if set,
    else `default` (the caller's choice, e.g. a script's sample folder); None if that folder has no frames."""
    env = os.environ.get(NYU_SAMPLE_ENV)
    if not env and default is None:
        return None
    path = Path(env or default).expanduser()
    return path if (path / "index.csv").is_file() else None


def dataset_label(source: str, split: str | None = None) -> str:
    """A short file-system-safe label for a dataset source (and split), e.g. `synthetic_test`."""
    base = "synthetic" if source == "synthetic" else Path(str(source).rstrip("/")).name or str(source)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "dataset"
    return f"{label}_{split}" if split and source == "synthetic" else label


def load_dataset_or_error(source: str, split: str, *, min_depth: float, max_depth: float, num_samples=None,
                          synthetic_size=(480, 640), seed=0, **kwargs):
    """`load_depth_dataset` with every failure turned into one `ValueError` line naming the source.

    `min_depth`, `max_depth` are the model's (`model.config`): depth outside them is invalid ground truth.
    """
    source = str(source)
    try:
        kind = classify_source(source)
    except ValueError as error:
        raise ValueError(f"cannot load dataset {source!r}: {first_line(error)}") from None
    if kind is SourceKind.MISSING:
        raise ValueError(f"dataset folder or file not found: {source}")
    try:
        dataset = load_depth_dataset(
            source, split=split, min_depth=min_depth, max_depth=max_depth, num_samples=num_samples,
            height=synthetic_size[0], width=synthetic_size[1], seed=seed, **kwargs,
        )
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"cannot load dataset {source!r} (split {split!r}): {first_line(error)}") from None
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"dataset {source!r} (split {split!r}) is empty")
    return dataset


def check_output_dir(output_dir: str | os.PathLike, create: bool = True) -> Path:
    """Make sure files can be written to `output_dir` (creating it with `create`), before any work is done.

    With `create=False` nothing is created: the folder, or the nearest folder above it that exists, must be
    writable. Raises `OSError` in one line naming the folder: a file in the way, or a folder that cannot be written.
    """
    path = Path(output_dir).expanduser()
    existing = next((parent for parent in (path, *path.parents) if parent.exists()), None)
    if existing is not None and not existing.is_dir():
        what = "is a file" if existing == path else f"cannot be created: {existing} is a file"
        raise NotADirectoryError(f"output folder {path} {what}")
    if not create:
        if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
            raise PermissionError(f"output folder {path} is not writable: {existing} does not allow it")
        return path
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as error:
        raise OSError(f"output folder {path} is not writable: {error.strerror or first_line(error)}") from None
    return path


# ------------------------------------------------------------------------------------------------
# Prediction and evaluation
# ------------------------------------------------------------------------------------------------


def _model_device_dtype(model) -> tuple[torch.device, torch.dtype]:
    for parameter in model.parameters():
        return parameter.device, parameter.dtype
    return torch.device("cpu"), torch.float32


@torch.no_grad()
def predict_depth(
    model,
    image_processor,
    images: Sequence[Any],
    target_sizes: Sequence[tuple[int, int]],
    *,
    input_size: tuple[int, int] | None = None,
    flip_average: bool = False,
    return_uncertainty: bool = False,
) -> list[np.ndarray] | tuple[list[np.ndarray], list[np.ndarray]]:
    """Metric depth (float32 metres) for each image, resized bilinearly to its `target_sizes` entry.

    With `flip_average`, the depth of the horizontally flipped image is flipped back and averaged with the direct
    prediction (at the model's output resolution, before resizing). With `return_uncertainty`, also the model's
    `depth_uncertainty` (metres) resized the same way (and averaged the same way with `flip_average`), as a second
    list; a model without it raises `ValueError`.
    """
    device, dtype = _model_device_dtype(model)
    kwargs = {"size": {"height": int(input_size[0]), "width": int(input_size[1])}} if input_size else {}
    pixel_values = image_processor(list(images), return_tensors="pt", **kwargs)["pixel_values"]
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    outputs = model(pixel_values=pixel_values)
    maps = [outputs.predicted_depth.float()]
    if return_uncertainty:
        if getattr(outputs, "depth_uncertainty", None) is None:
            raise ValueError("the model returns no depth_uncertainty (it has no depth bins, e.g. head='regression')")
        maps.append(outputs.depth_uncertainty.float())
    if flip_average:
        flipped = model(pixel_values=torch.flip(pixel_values, dims=[-1]))
        flipped_maps = [flipped.predicted_depth] + ([flipped.depth_uncertainty] if return_uncertainty else [])
        maps = [0.5 * (m + torch.flip(f.float(), dims=[-1])) for m, f in zip(maps, flipped_maps)]
    results = []
    for values in maps:
        resized = []
        for depth, size in zip(values, target_sizes):
            size = (int(size[0]), int(size[1]))
            if tuple(depth.shape[-2:]) != size:
                depth = F.interpolate(depth[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
            resized.append(depth.cpu().numpy().astype(np.float32))
        results.append(resized)
    return tuple(results) if return_uncertainty else results[0]


def depth_range(model, min_depth: float | None = None, max_depth: float | None = None) -> tuple[float, float]:
    """The evaluation's `[min_depth, max_depth]`: the model config's unless given."""
    config = getattr(model, "config", None)
    if min_depth is None:
        min_depth = getattr(config, "min_depth", None)
    if max_depth is None:
        max_depth = getattr(config, "max_depth", None)
    if min_depth is None or max_depth is None:
        raise ValueError("the depth range is not known: the model has no config.min_depth/max_depth; pass them")
    min_depth, max_depth = float(min_depth), float(max_depth)
    if not 0 < min_depth < max_depth:
        raise ValueError(f"need 0 < min_depth < max_depth, got {min_depth} and {max_depth}")
    return min_depth, max_depth


def _local_examples(dataset, process_index: int, num_processes: int):
    """This process's share of the frames: contiguous chunks of a map-style dataset (no padding, no repeats),
    every `num_processes`-th example of an iterable one."""
    if hasattr(dataset, "__len__") and hasattr(dataset, "__getitem__"):
        total = len(dataset)
        per_process, extra = divmod(total, num_processes)
        start = process_index * per_process + min(process_index, extra)
        stop = start + per_process + (1 if process_index < extra else 0)
        return (dataset[i] for i in range(start, stop)), stop - start
    return (example for i, example in enumerate(dataset) if i % num_processes == process_index), None


def _batched(iterable: Iterable, size: int):
    batch = []
    for item in iterable:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def safe_frame_filename(name: str) -> str:
    """A frame name as one file name (folders flattened with `__`, no `..`)."""
    flat = str(name).replace("\\", "/").strip("/").replace("/", "__")
    flat = re.sub(r"[^A-Za-z0-9_.+-]+", "_", flat).replace("..", "_")
    return flat or "frame"


@dataclass
class EvaluationSettings:
    """How `evaluate` scores a model (each also a keyword argument of `evaluate`).

    Args:
        batch_size: images per forward pass and process.
        crop: `"eigen"`, `"garg"` or `None`/`"none"`.
        min_depth, max_depth: clamp range of the prediction and valid range of the ground truth; default: the
            model's `config.min_depth` and `config.max_depth`.
        flip_average: average with the prediction of the horizontally flipped image.
        input_size: `(height, width)` fed to the model; default: the image processor's size.
        predictions_dir: if given, each prediction is saved there as float32 `.npy` in metres named after its frame.
        num_visual_samples: how many frames (the first of the main process) to keep for the picture panel.
        dataset_name, model_name: recorded in the protocol and named in messages.
        show_progress: a progress bar on the main process.
        uncertainty: also evaluate the model's `depth_uncertainty` with sparsification curves and AUSE
            (`evaluation.uncertainty`), on the same pixels as the metrics; the random order is seeded with
            `uncertainty_seed`.
    """

    batch_size: int = 8
    crop: str | None = "eigen"
    min_depth: float | None = None
    max_depth: float | None = None
    flip_average: bool = False
    input_size: tuple[int, int] | None = None
    predictions_dir: str | os.PathLike | None = None
    num_visual_samples: int = 4
    dataset_name: str | None = None
    model_name: str | None = None
    show_progress: bool = True
    uncertainty: bool = False
    uncertainty_seed: int = 0


def evaluate(
    model,
    image_processor,
    dataset,
    settings: EvaluationSettings | None = None,
    *,
    accelerator=None,
    predict_fn: Callable[[list[dict]], list[np.ndarray]] | None = None,
    **options,
) -> dict:
    """Evaluate `model` on `dataset` with the NYU protocol; returns a dict with the results on every process.

    Args:
        model: a depth model returning `predicted_depth` in metres (unwrapped from DDP; it is put in eval mode and
            restored to its previous mode at the end).
        image_processor: turns PIL images into `pixel_values` (`MoADepthCLIPImageProcessor`).
        dataset: examples `{"image", "depth", "name"}` (`load_depth_dataset`): map-style, a list or iterable.
        settings: an `EvaluationSettings`; `options` (its field names as keywords) override its fields.
        accelerator: with several processes the frames are split between them and the per-image results are
            gathered and merged by frame name, so every frame counts once.
        predict_fn: replaces the model call: examples -> depth maps (any size, resized to the ground truth); used
            to check the protocol with known predictions. With `uncertainty`, it returns `(depth maps, uncertainty
            maps)`, the uncertainty at the ground truth's size.

    Returns:
        `{"metrics": {key: mean over images}, "num_images", "per_image": [{"name", key...}] sorted by name,
        "skipped": [names of frames without a valid ground-truth pixel], "protocol": {...},
        "samples": [{"name", "image", "depth", "prediction"}] (main process)}`, and with `uncertainty`
        `"uncertainty"`: `SparsificationAccumulator.compute()` (curves, AUSE, the random order's AUSE, AURG).

    Raises:
        ValueError: no frame at all could be scored (an empty dataset, or no valid pixel in any frame).
    """
    settings = replace(settings or EvaluationSettings(), **options)
    min_depth, max_depth = depth_range(model, settings.min_depth, settings.max_depth)
    crop = None if settings.crop in (None, "none") else settings.crop
    if settings.uncertainty and predict_fn is None and not has_depth_bins(model.config):
        raise ValueError(
            f"cannot evaluate uncertainty: the model has no depth bins (head={model.config.head!r}), so no "
            "depth_uncertainty"
        )
    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    accumulator = DepthMetricsAccumulator(min_depth=min_depth, max_depth=max_depth, crop=crop)
    sparsification = (
        SparsificationAccumulator(min_depth, max_depth, crop, seed=settings.uncertainty_seed)
        if settings.uncertainty
        else None
    )
    examples, local_count = _local_examples(dataset, process_index, num_processes)
    scoring = _LocalScoring(
        model, image_processor, settings, predict_fn, accumulator, sparsification, is_main=process_index == 0
    )
    with _eval_mode(model), _progress_bar(settings, local_count, process_index == 0) as progress:
        for batch in _batched(examples, settings.batch_size):
            scoring.score(batch)
            progress.update(len(batch))
    if scoring.duplicates:
        logger.warning(f"{scoring.duplicates} frame(s) repeat an earlier frame's name and were counted once")
    accumulator, sparsification, skipped = _gathered(accumulator, sparsification, scoring.skipped, num_processes)
    valid_gt = f"finite and in ({min_depth:g}, {max_depth:g}] m"
    _check_scored(accumulator, skipped, settings.dataset_name, f"{valid_gt}, crop {crop or 'none'}")
    protocol = {
        "crop": crop or "none",
        "clamp_range_m": [min_depth, max_depth],
        "valid_gt": valid_gt,
        "averaging": AVERAGING,
        "prediction_resize": "bilinear to the ground-truth size",
        "flip_average": bool(settings.flip_average),
        "input_size": list(settings.input_size) if settings.input_size else _processor_size(image_processor),
        "dataset": settings.dataset_name,
        "model": settings.model_name,
        "num_processes": num_processes,
    }
    result = {
        "metrics": accumulator.compute(),
        "num_images": len(accumulator),
        "per_image": sorted(accumulator.per_image, key=lambda record: record["name"]),
        "skipped": sorted(skipped),
        "protocol": protocol,
        "samples": scoring.samples,
    }
    if sparsification is not None:
        result["uncertainty"] = sparsification.compute()
    return result


class _LocalScoring:
    """This process's frames: predicted, scored into the accumulator, optionally saved and kept for the panel."""

    def __init__(self, model, image_processor, settings: EvaluationSettings, predict_fn, accumulator,
                 sparsification: SparsificationAccumulator | None, is_main: bool):  # fmt: skip
        self.model, self.image_processor, self.settings = model, image_processor, settings
        self.predict_fn, self.accumulator, self.is_main = predict_fn, accumulator, is_main
        self.sparsification = sparsification
        self.predictions_dir = Path(settings.predictions_dir) if settings.predictions_dir is not None else None
        if self.predictions_dir is not None:
            self.predictions_dir.mkdir(parents=True, exist_ok=True)
        self.skipped: set[str] = set()
        self.samples: list[dict] = []
        self.duplicates = 0

    def predict(self, batch: list[dict], gts: list[np.ndarray]) -> tuple[list[np.ndarray], list]:
        """Depth maps at the ground truths' sizes, and the uncertainty maps (Nones unless evaluated)."""
        uncertain = self.sparsification is not None
        if self.predict_fn is None:
            predicted = predict_depth(self.model, self.image_processor, [example["image"] for example in batch],
                                      [g.shape for g in gts], input_size=self.settings.input_size,
                                      flip_average=self.settings.flip_average, return_uncertainty=uncertain)
            return predicted if uncertain else (predicted, [None] * len(batch))
        predictions = self.predict_fn(batch)
        predictions, uncertainties = predictions if uncertain else (predictions, [None] * len(batch))
        predictions = [np.asarray(p, dtype=np.float32) for p in predictions]
        predictions = [
            p if p.shape == g.shape else
            F.interpolate(torch.from_numpy(p)[None, None], size=g.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
            for p, g in zip(predictions, gts)
        ]
        return predictions, uncertainties

    def score(self, batch: list[dict]):
        gts = [np.asarray(example["depth"], dtype=np.float32) for example in batch]
        predictions, uncertainties = self.predict(batch, gts)
        for example, prediction, gt, uncertainty in zip(batch, predictions, gts, uncertainties):
            name = str(example["name"])
            before = len(self.accumulator)
            try:
                self.accumulator.update(prediction, gt, name)
            except NoValidDepthError:
                self.skipped.add(name)
                continue
            self.duplicates += len(self.accumulator) == before
            if self.sparsification is not None:
                self.sparsification.update(prediction, gt, uncertainty, name)
            if self.predictions_dir is not None:
                np.save(self.predictions_dir / f"{safe_frame_filename(name)}.npy", prediction.astype(np.float32))
            if self.is_main and len(self.samples) < self.settings.num_visual_samples:
                self.samples.append({"name": name, "image": np.asarray(example["image"].convert("RGB")), "depth": gt,
                                     "prediction": prediction})


@contextlib.contextmanager
def _eval_mode(model):
    """The model in eval mode, restored to training mode afterwards if it was training."""
    was_training = getattr(model, "training", False) if model is not None else False
    if model is not None and hasattr(model, "eval"):
        model.eval()
    try:
        yield
    finally:
        if model is not None and was_training:
            model.train()


@contextlib.contextmanager
def _progress_bar(settings: EvaluationSettings, total: int | None, is_main: bool):
    disable = not (settings.show_progress and is_main)
    description = f"evaluate {settings.dataset_name or ''}".strip()
    with tqdm(total=total, desc=description, unit="img", leave=False, disable=disable) as progress:
        yield progress


def _gathered(accumulator: DepthMetricsAccumulator, sparsification: SparsificationAccumulator | None,
              skipped: set[str], num_processes: int):  # fmt: skip
    """Every process's per-image results (and sparsification records) merged by frame name, each frame counted
    once, and all skipped frames."""
    if num_processes == 1:
        return accumulator, sparsification, skipped
    merged = DepthMetricsAccumulator(min_depth=accumulator.min_depth, max_depth=accumulator.max_depth,
                                     crop=accumulator.crop)
    merged_sparsification = (
        SparsificationAccumulator(sparsification.min_depth, sparsification.max_depth, sparsification.crop,
                                  seed=sparsification.seed, fractions=sparsification.fractions,
                                  metrics=sparsification.metrics)  # fmt: skip
        if sparsification is not None
        else None
    )
    local = {"records": accumulator.state(), "skipped": sorted(skipped)}
    if sparsification is not None:
        local["sparsification"] = sparsification.state()
    skipped = set(skipped)
    for part in gather_object([local]):
        merged.merge(part["records"])
        skipped.update(part["skipped"])
        if merged_sparsification is not None:
            merged_sparsification.merge(part["sparsification"])
    return merged, merged_sparsification, skipped


def _check_scored(accumulator, skipped: set[str], dataset_name: str | None, valid: str):
    """Warn about skipped frames; ValueError when no frame at all was scored."""
    name = dataset_name or "the dataset"
    if skipped:
        logger.warning(
            f"{len(skipped)} frame(s) of {name} have no valid ground-truth pixel ({valid}) and were skipped: "
            f"{', '.join(sorted(skipped)[:5])}" + (" ..." if len(skipped) > 5 else "")
        )
    if len(accumulator) == 0:
        if skipped:
            raise ValueError(
                f"no frame of {name} has a valid ground-truth pixel ({valid}): all {len(skipped)} skipped; is the "
                "depth range of the model right for this data?"
            )
        raise ValueError(f"no frames evaluated: dataset {dataset_name or ''} yielded no examples")


def _processor_size(image_processor) -> list[int] | None:
    size = getattr(image_processor, "size", None)
    if isinstance(size, dict) and "height" in size:
        return [int(size["height"]), int(size["width"])]
    return None


# ------------------------------------------------------------------------------------------------
# Outputs
# ------------------------------------------------------------------------------------------------


def save_samples_panel(samples: Sequence[dict], path: str | os.PathLike, title: str | None = None) -> Path | None:
    """RGB | ground truth | prediction | absolute error, one row per sample; depth panels share one colour bar."""
    if not samples:
        return None
    import matplotlib  # optional dependency: only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # the colour scale spans the valid ground truth, or the predictions if no frame has any
    values = [s["depth"][s["depth"] > 0] for s in samples]
    if not any(v.size for v in values):
        values = [np.asarray(s["prediction"]).ravel() for s in samples]
    vmin = float(min(v.min() for v in values if v.size))
    vmax = float(max(v.max() for v in values if v.size))
    errors = [np.where(s["depth"] > 0, np.abs(s["prediction"] - s["depth"]), np.nan) for s in samples]
    emax = float(np.nanmax([np.nanmax(e) if np.isfinite(e).any() else 0.0 for e in errors])) or 1.0

    rows = len(samples)
    fig, axes = plt.subplots(rows, 4, figsize=(14, 2.9 * rows + 0.6), squeeze=False, constrained_layout=True)
    depth_cmap = plt.get_cmap("turbo_r").with_extremes(bad="black")
    error_cmap = plt.get_cmap("magma").with_extremes(bad="black")
    depth_image = error_image = None
    for row, (sample, error) in enumerate(zip(samples, errors)):
        gt = np.where(sample["depth"] > 0, sample["depth"], np.nan)
        axes[row, 0].imshow(sample["image"])
        axes[row, 0].set_ylabel(sample["name"], fontsize=8)
        depth_image = axes[row, 1].imshow(gt, cmap=depth_cmap, vmin=vmin, vmax=vmax)
        axes[row, 2].imshow(sample["prediction"], cmap=depth_cmap, vmin=vmin, vmax=vmax)
        error_image = axes[row, 3].imshow(error, cmap=error_cmap, vmin=0.0, vmax=emax)
        for column, label in enumerate(("RGB", "ground truth", "prediction", "|error|")):
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
            if row == 0:
                axes[row, column].set_title(label)
    fig.colorbar(depth_image, ax=axes[:, 1:3], label="depth (m)", shrink=0.9)
    fig.colorbar(error_image, ax=axes[:, 3], label="absolute error (m)", shrink=0.9)
    if title:
        fig.suptitle(title)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path


def _skipped_note(result: dict) -> str | None:
    skipped = result.get("skipped") or []
    if not skipped:
        return None
    return (f"skipped {len(skipped)} frame(s) without a valid ground-truth pixel "
            f"({result['protocol']['valid_gt']}): {', '.join(skipped)}")


def write_evaluation_outputs(result: dict, output_dir: str | os.PathLike, title: str | None = None) -> dict[str, Path]:
    """Write metrics.json, metrics.md, per_image_metrics.csv and samples.png; returns their paths.

    With an uncertainty evaluation (`result["uncertainty"]`) metrics.json gains `"uncertainty"` (curves, AUSE,
    the random order's AUSE, AURG), metrics.md its table, and sparsification.png the curves."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    skipped = list(result.get("skipped") or [])
    payload = {
        **result["metrics"],
        "num_images": result["num_images"],
        "num_skipped": len(skipped),
        "skipped_frames": skipped,
        "protocol": result["protocol"],
    }
    if result.get("uncertainty"):
        payload["uncertainty"] = result["uncertainty"]
    paths["metrics_json"] = output_dir / "metrics.json"
    paths["metrics_json"].write_text(json.dumps(payload, indent=2) + "\n")

    protocol = result["protocol"]
    low, high = protocol["clamp_range_m"]
    lines = [
        f"# {title or 'Depth evaluation'}",
        "",
        format_metrics_markdown(result["metrics"]),
        "",
        f"- images: {result['num_images']}",
        *([f"- {_skipped_note(result)}"] if skipped else []),
        f"- dataset: {protocol.get('dataset')}",
        f"- model: {protocol.get('model')}",
        f"- crop: {protocol['crop']}; prediction clamped to [{low:g}, {high:g}] m; valid ground truth "
        f"{protocol['valid_gt']}",
        f"- prediction resized {protocol['prediction_resize']}; input size {protocol.get('input_size')}; "
        f"flip averaging: {'yes' if protocol['flip_average'] else 'no'}",
        f"- averaging: {protocol['averaging']}",
        "",
    ]
    if result.get("uncertainty"):
        lines.append(format_uncertainty_markdown(result["uncertainty"]))
    paths["metrics_md"] = output_dir / "metrics.md"
    paths["metrics_md"].write_text("\n".join(lines))

    paths["per_image_csv"] = output_dir / "per_image_metrics.csv"
    with open(paths["per_image_csv"], "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", *METRIC_KEYS])
        for record in result["per_image"]:
            writer.writerow([record["name"], *(f"{record[k]:.6g}" for k in METRIC_KEYS)])

    panel = save_samples_panel(result["samples"], output_dir / "samples.png", title)
    if panel is not None:
        paths["samples_png"] = panel
    if result.get("uncertainty"):
        curves_title = f"Sparsification curves: {title}" if title else None
        paths["sparsification_png"] = plot_sparsification(
            result["uncertainty"], output_dir / "sparsification.png", curves_title
        )
    return paths


def format_result_line(result: dict) -> str:
    m = result["metrics"]
    skipped = len(result.get("skipped") or [])
    return (
        f"d1={m['d1']:.4f} d2={m['d2']:.4f} d3={m['d3']:.4f} abs_rel={m['abs_rel']:.4f} "
        f"sq_rel={m['sq_rel']:.4f} rmse={m['rmse']:.4f} rmse_log={m['rmse_log']:.4f} "
        f"log10={m['log10']:.4f} silog={m['silog']:.4f} ({result['num_images']} images"
        + (f", {skipped} skipped: no valid pixel" if skipped else "") + ")"
    )


def format_report(result: dict, title: str, seconds: float, paths: dict[str, Path] | None = None) -> str:
    """The evaluation's closing report: metrics, protocol (crop, clamp range), time and the files written."""
    protocol = result["protocol"]
    low, high = protocol["clamp_range_m"]
    lines = [
        f"{title}: {format_result_line(result)}",
        f"metrics averaged {AVERAGING}; crop {protocol['crop']}, clamp [{low:g}, {high:g}] m; {seconds:.1f} s",
    ]
    note = _skipped_note(result)
    if note:
        lines.append(note)
    summary = result.get("uncertainty")
    if summary:
        lines.append(
            "uncertainty: "
            + "; ".join(
                f"AUSE {metric}={summary['ause'][metric]:.4f} (random order {summary['ause_random'][metric]:.4f}, "
                f"AURG {summary['aurg'][metric]:.4f})"
                for metric in summary["ause"]
            )
        )
    lines += [f"  {key}: {path}" for key, path in (paths or {}).items()]
    return "\n".join(lines)
