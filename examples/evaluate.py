#!/usr/bin/env python
"""Evaluate a MoA-DepthCLIP checkpoint on NYU Depth V2 (or any depth dataset) with the standard protocol.

    python examples/evaluate.py --model outputs/train/best
    accelerate launch --cpu --num_processes 2 examples/evaluate.py --model PATH --dataset ../shared/data/nyu_eigen_test_sample

Protocol (the one of the BTS / AdaBins / DenseDepth NYU evaluation code):

* the model predicts at its input size (`--input_size`, default: the checkpoint's image processor), the prediction is
  resized bilinearly to the ground truth's size (480x640 on NYU), optionally averaged with the prediction of the
  horizontally flipped image (`--flip_average`);
* predictions are clamped to [`--min_depth`, `--max_depth`] = [1e-3, 10] m; ground-truth pixels outside
  (min_depth, max_depth] or not finite are invalid; only the Eigen crop (rows 45-471, cols 41-601 at 480x640) is
  scored by default (`--crop garg|eigen|none`);
* d1, d2, d3, abs_rel, sq_rel, rmse, rmse_log, log10, silog are computed per image on its valid pixels and then
  averaged over images (not over pixels).

Writes to `--output_dir`: `metrics.json` (the metrics, `num_images` and the `protocol`), `metrics.md`,
`per_image_metrics.csv`, `samples.png` (RGB | ground truth | prediction | absolute error for a few frames) and,
with `--save_predictions`, one float32 `.npy` in metres per frame under `predictions/`.

Under `accelerate launch` with several processes the frames are split between the processes without padding and
the per-image results are gathered and merged by frame name, so every frame is counted exactly once.

`evaluate(model, image_processor, dataset, ...)` is the function `examples/train.py` reuses.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import re
import sys
import time
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a small CPU machine shared with
# another busy torch process, spinning threads made a ViT-B/32 training step (batch 8, 2 cores) take 10 s instead of
# 1.45 s; on an idle machine sleeping costs ~15 % (0.86 s instead of 0.74 s). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F


EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(1, str(REPO_ROOT))

from modeling_moa_depthclip.metrics import (  # noqa: E402
    METRIC_KEYS,
    DepthMetricsAccumulator,
    format_metrics_markdown,
)


logger = logging.getLogger("moa_depthclip.evaluate")

NYU_SAMPLE_ENV = "MOA_DEPTHCLIP_NYU_SAMPLE"
CROPS = ("eigen", "garg", "none")
AVERAGING = (
    "per-image: each metric is computed on the valid pixels of one image, then averaged over images "
    "(as the common BTS/AdaBins/DenseDepth NYU evaluation code does)"
)


# ------------------------------------------------------------------------------------------------
# Locations and loading
# ------------------------------------------------------------------------------------------------


def default_nyu_sample_dir() -> Path | None:
    """The shared real NYU frames: `$MOA_DEPTHCLIP_NYU_SAMPLE`, else `../shared/data/nyu_eigen_test_sample`."""
    env = os.environ.get(NYU_SAMPLE_ENV)
    path = Path(env).expanduser() if env else REPO_ROOT.parent / "shared" / "data" / "nyu_eigen_test_sample"
    return path if (path / "index.csv").is_file() else None


def is_local_path(source: str) -> bool:
    """Whether a `--model`/`--dataset` value names a local file or folder rather than a Hub id or keyword."""
    source = str(source)
    return (
        os.path.exists(os.path.expanduser(source))
        or source.startswith(("/", "./", "../", "~", "."))
        or "\\" in source
        or source.count("/") > 1
        or source.endswith((".json", ".csv", ".txt"))
    )


def dataset_label(source: str, split: str | None = None) -> str:
    """A short file-system-safe label for a dataset source (and split), e.g. `synthetic_test`."""
    if source == "synthetic":
        base = "synthetic"
    else:
        base = Path(str(source).rstrip("/")).name or str(source)
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", base).strip("_") or "dataset"
    return f"{label}_{split}" if split and source == "synthetic" else label


def load_dataset_or_error(source: str, split: str, *, num_samples=None, synthetic_size=(480, 640), seed=0, **kwargs):
    """`load_depth_dataset` with every failure turned into one `ValueError` line naming the source."""
    from modeling_moa_depthclip.data import SourceKind, classify_source, load_depth_dataset

    source = str(source)
    if classify_source(source) is SourceKind.MISSING:
        raise ValueError(f"dataset folder or file not found: {source}")
    try:
        dataset = load_depth_dataset(
            source,
            split=split,
            num_samples=num_samples,
            height=synthetic_size[0],
            width=synthetic_size[1],
            seed=seed,
            **kwargs,
        )
    except (OSError, ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load dataset {source!r} (split {split!r}): {message}") from None
    if hasattr(dataset, "__len__") and len(dataset) == 0:
        raise ValueError(f"dataset {source!r} (split {split!r}) is empty")
    return dataset


def load_model_and_processor(model_id: str, *, device=None):
    """Load a MoA-DepthCLIP checkpoint (folder or Hub id) and its image processor, in eval mode."""
    import modeling_moa_depthclip  # noqa: F401  (registers the model with the auto classes)
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    from modeling_moa_depthclip import MoADepthCLIPImageProcessor

    try:
        model = AutoModelForDepthEstimation.from_pretrained(model_id)
    except (OSError, ValueError, KeyError) as error:
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"cannot load model {model_id!r}: {message}") from None
    try:
        image_processor = AutoImageProcessor.from_pretrained(model_id)
    except (OSError, ValueError, KeyError):
        patch = model.config.vision_config.patch_size
        size = model.config.vision_config.image_size
        logger.warning(f"{model_id} has no image processor; using a default one at {size}x{size}")
        image_processor = MoADepthCLIPImageProcessor(size={"height": size, "width": size}, size_divisor=patch)
    if device is not None:
        model.to(device)
    return model.eval(), image_processor


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
) -> list[np.ndarray]:
    """Metric depth (float32 metres) for each image, resized bilinearly to its `target_sizes` entry.

    With `flip_average`, the depth of the horizontally flipped image is flipped back and averaged with the direct
    prediction (at the model's output resolution, before resizing).
    """
    device, dtype = _model_device_dtype(model)
    kwargs = {"size": {"height": int(input_size[0]), "width": int(input_size[1])}} if input_size else {}
    pixel_values = image_processor(list(images), return_tensors="pt", **kwargs)["pixel_values"]
    pixel_values = pixel_values.to(device=device, dtype=dtype)
    predicted = model(pixel_values=pixel_values).predicted_depth.float()
    if flip_average:
        flipped = model(pixel_values=torch.flip(pixel_values, dims=[-1])).predicted_depth.float()
        predicted = 0.5 * (predicted + torch.flip(flipped, dims=[-1]))
    results = []
    for depth, size in zip(predicted, target_sizes):
        size = (int(size[0]), int(size[1]))
        if tuple(depth.shape[-2:]) != size:
            depth = F.interpolate(depth[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        results.append(depth.cpu().numpy().astype(np.float32))
    return results


def _local_examples(dataset, process_index: int, num_processes: int) -> Iterable[dict]:
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


def evaluate(
    model,
    image_processor,
    dataset,
    *,
    accelerator=None,
    batch_size: int = 8,
    crop: str | None = "eigen",
    min_depth: float = 1e-3,
    max_depth: float = 10.0,
    flip_average: bool = False,
    input_size: tuple[int, int] | None = None,
    predictions_dir: str | os.PathLike | None = None,
    num_visual_samples: int = 4,
    dataset_name: str | None = None,
    model_name: str | None = None,
    predict_fn: Callable[[list[dict]], list[np.ndarray]] | None = None,
    show_progress: bool = True,
) -> dict:
    """Evaluate `model` on `dataset` with the NYU protocol; returns a dict with the results on every process.

    Args:
        model: a depth model returning `predicted_depth` in metres (unwrapped from DDP; it is put in eval mode and
            restored to its previous mode at the end).
        image_processor: turns PIL images into `pixel_values` (`MoADepthCLIPImageProcessor`).
        dataset: examples `{"image", "depth", "name"}` (`load_depth_dataset`): map-style, a list or iterable.
        accelerator: with several processes the frames are split between them and the per-image results are
            gathered and merged by frame name, so every frame counts once.
        crop: `"eigen"`, `"garg"` or `None`/`"none"`.
        min_depth, max_depth: clamp range of the prediction and valid range of the ground truth.
        flip_average: average with the prediction of the horizontally flipped image.
        input_size: `(height, width)` fed to the model; default: the image processor's size.
        predictions_dir: if given, each prediction is saved there as float32 `.npy` in metres named after its frame.
        num_visual_samples: how many frames (the first of the main process) to keep for the picture panel.
        predict_fn: replaces the model call: examples -> depth maps (any size, resized to the ground truth); used
            to check the protocol with known predictions.

    Returns:
        `{"metrics": {key: mean over images}, "num_images", "per_image": [{"name", key...}] sorted by name,
        "protocol": {...}, "samples": [{"name", "image", "depth", "prediction"}] (main process)}`.
    """
    crop = None if crop in (None, "none") else crop
    process_index = accelerator.process_index if accelerator is not None else 0
    num_processes = accelerator.num_processes if accelerator is not None else 1
    is_main = process_index == 0
    if predictions_dir is not None:
        predictions_dir = Path(predictions_dir)
        predictions_dir.mkdir(parents=True, exist_ok=True)

    was_training = getattr(model, "training", False) if model is not None else False
    if model is not None and hasattr(model, "eval"):
        model.eval()
    accumulator = DepthMetricsAccumulator(min_depth=min_depth, max_depth=max_depth, crop=crop)
    samples: list[dict] = []
    examples, local_count = _local_examples(dataset, process_index, num_processes)
    progress = None
    if show_progress and is_main:
        from tqdm.auto import tqdm

        progress = tqdm(total=local_count, desc=f"evaluate {dataset_name or ''}".strip(), unit="img", leave=False)
    local_duplicates = 0
    try:
        for batch in _batched(examples, batch_size):
            gts = [np.asarray(example["depth"], dtype=np.float32) for example in batch]
            if predict_fn is not None:
                predictions = [np.asarray(p, dtype=np.float32) for p in predict_fn(batch)]
                predictions = [
                    p if p.shape == g.shape else
                    F.interpolate(torch.from_numpy(p)[None, None], size=g.shape, mode="bilinear", align_corners=False)[0, 0].numpy()
                    for p, g in zip(predictions, gts)
                ]
            else:
                predictions = predict_depth(
                    model,
                    image_processor,
                    [example["image"] for example in batch],
                    [g.shape for g in gts],
                    input_size=input_size,
                    flip_average=flip_average,
                )
            for example, prediction, gt in zip(batch, predictions, gts):
                name = str(example["name"])
                before = len(accumulator)
                accumulator.update(prediction, gt, name)
                if len(accumulator) == before:
                    local_duplicates += 1
                if predictions_dir is not None:
                    np.save(predictions_dir / f"{safe_frame_filename(name)}.npy", prediction.astype(np.float32))
                if is_main and len(samples) < num_visual_samples:
                    samples.append(
                        {"name": name, "image": np.asarray(example["image"].convert("RGB")), "depth": gt, "prediction": prediction}
                    )
            if progress is not None:
                progress.update(len(batch))
    finally:
        if progress is not None:
            progress.close()
        if model is not None and was_training:
            model.train()
    if local_duplicates:
        logger.warning(f"{local_duplicates} frame(s) repeat an earlier frame's name and were counted once")

    if num_processes > 1:
        from accelerate.utils import gather_object

        merged = DepthMetricsAccumulator(min_depth=min_depth, max_depth=max_depth, crop=crop)
        merged.merge(gather_object(accumulator.state()))
        accumulator = merged
    if len(accumulator) == 0:
        raise ValueError(f"no frames evaluated: dataset {dataset_name or ''} yielded no examples")
    per_image = sorted(accumulator.per_image, key=lambda record: record["name"])
    protocol = {
        "crop": crop or "none",
        "clamp_range_m": [float(min_depth), float(max_depth)],
        "valid_gt": f"finite and in ({min_depth}, {max_depth}] m",
        "averaging": AVERAGING,
        "prediction_resize": "bilinear to the ground-truth size",
        "flip_average": bool(flip_average),
        "input_size": list(input_size) if input_size else _processor_size(image_processor),
        "dataset": dataset_name,
        "model": model_name,
        "num_processes": num_processes,
    }
    return {
        "metrics": accumulator.compute(),
        "num_images": len(accumulator),
        "per_image": per_image,
        "protocol": protocol,
        "samples": samples,
    }


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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    valid_values = [s["depth"][s["depth"] > 0] for s in samples]
    vmin = float(min(v.min() for v in valid_values if v.size)) if any(v.size for v in valid_values) else 0.0
    vmax = float(max(v.max() for v in valid_values if v.size)) if any(v.size for v in valid_values) else 10.0
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


def write_evaluation_outputs(result: dict, output_dir: str | os.PathLike, title: str | None = None) -> dict[str, Path]:
    """Write metrics.json, metrics.md, per_image_metrics.csv and samples.png; returns their paths."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    payload = {**result["metrics"], "num_images": result["num_images"], "protocol": result["protocol"]}
    paths["metrics_json"] = output_dir / "metrics.json"
    paths["metrics_json"].write_text(json.dumps(payload, indent=2) + "\n")

    protocol = result["protocol"]
    lines = [
        f"# {title or 'Depth evaluation'}",
        "",
        format_metrics_markdown(result["metrics"]),
        "",
        f"- images: {result['num_images']}",
        f"- dataset: {protocol.get('dataset')}",
        f"- model: {protocol.get('model')}",
        f"- crop: {protocol['crop']}; prediction clamped to [{protocol['clamp_range_m'][0]:g}, "
        f"{protocol['clamp_range_m'][1]:g}] m; valid ground truth {protocol['valid_gt']}",
        f"- prediction resized {protocol['prediction_resize']}; input size {protocol.get('input_size')}; "
        f"flip averaging: {'yes' if protocol['flip_average'] else 'no'}",
        f"- averaging: {protocol['averaging']}",
        "",
    ]
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
    return paths


def format_result_line(result: dict) -> str:
    m = result["metrics"]
    return (
        f"d1={m['d1']:.4f} d2={m['d2']:.4f} d3={m['d3']:.4f} abs_rel={m['abs_rel']:.4f} "
        f"sq_rel={m['sq_rel']:.4f} rmse={m['rmse']:.4f} rmse_log={m['rmse_log']:.4f} "
        f"log10={m['log10']:.4f} silog={m['silog']:.4f} ({result['num_images']} images)"
    )


# ------------------------------------------------------------------------------------------------
# Command line
# ------------------------------------------------------------------------------------------------


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    nyu = default_nyu_sample_dir()
    parser = argparse.ArgumentParser(
        prog=f"{Path(__file__).name}",
        description="Evaluate a MoA-DepthCLIP checkpoint with the standard NYU Depth V2 protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default="outputs/train/best",
        help="checkpoint folder or Hub id (save_pretrained of MoADepthCLIPForDepthEstimation)",
    )
    parser.add_argument(
        "--dataset", default=str(nyu) if nyu else "synthetic",
        help="'synthetic', a DenseDepth/BTS folder, a save_to_disk folder or a Hub dataset id "
        "(default: the shared NYU frames if present, else synthetic)",
    )
    parser.add_argument("--split", default="test", help="dataset split")
    parser.add_argument("--output_dir", default="outputs/evaluate", help="where metrics and pictures go")
    parser.add_argument("--save_predictions", action="store_true", help="save each prediction as float32 .npy (m)")
    parser.add_argument("--batch_size", type=_positive_int, default=8, help="images per forward pass and process")
    parser.add_argument(
        "--input_size", type=_positive_int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
        help="model input size (multiples of the patch size); default: the checkpoint's image processor",
    )
    parser.add_argument("--crop", choices=CROPS, default="eigen", help="evaluation crop")
    parser.add_argument("--flip_average", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--min_depth", type=float, default=1e-3, help="clamp/valid range lower bound (m)")
    parser.add_argument("--max_depth", type=float, default=10.0, help="clamp/valid range upper bound (m)")
    parser.add_argument("--num_samples", type=_positive_int, default=None, help="evaluate only the first N frames")
    parser.add_argument(
        "--synthetic_size", type=_positive_int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=(480, 640),
        help="frame size of synthetic scenes",
    )
    parser.add_argument("--num_visual_samples", type=int, default=4, help="frames in samples.png (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    return parser


def check_input_size(parser, input_size, divisor: int):
    if input_size is not None and (input_size[0] % divisor or input_size[1] % divisor):
        parser.error(f"--input_size {input_size[0]} {input_size[1]}: both sides must be multiples of {divisor}")


def main(argv: Sequence[str] | None = None) -> dict:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not 0 < args.min_depth < args.max_depth:
        parser.error(f"need 0 < --min_depth < --max_depth, got {args.min_depth} and {args.max_depth}")
    if is_local_path(args.model) and not os.path.isdir(os.path.expanduser(args.model)):
        parser.error(
            f"--model {args.model}: no such folder"
            + (" (train one first with examples/train.py, or pass --model)" if args.model == "outputs/train/best" else "")
        )
    try:
        dataset = load_dataset_or_error(
            args.dataset, args.split, num_samples=args.num_samples, synthetic_size=args.synthetic_size, seed=args.seed
        )
    except ValueError as error:
        parser.error(f"--dataset: {error}")

    from accelerate import Accelerator

    accelerator = Accelerator()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
        force=True,
    )
    try:
        model, image_processor = load_model_and_processor(args.model, device=accelerator.device)
    except ValueError as error:
        parser.error(f"--model: {error}")
    check_input_size(parser, args.input_size, getattr(image_processor, "size_divisor", 32))

    output_dir = Path(args.output_dir)
    start = time.perf_counter()
    result = evaluate(
        model,
        image_processor,
        dataset,
        accelerator=accelerator,
        batch_size=args.batch_size,
        crop=args.crop,
        min_depth=args.min_depth,
        max_depth=args.max_depth,
        flip_average=args.flip_average,
        input_size=tuple(args.input_size) if args.input_size else None,
        predictions_dir=output_dir / "predictions" if args.save_predictions else None,
        num_visual_samples=args.num_visual_samples,
        dataset_name=f"{args.dataset} ({args.split})",
        model_name=args.model,
    )
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        title = f"{Path(str(args.model).rstrip('/')).name} on {dataset_label(args.dataset, args.split)}"
        paths = write_evaluation_outputs(result, output_dir, title)
        print(f"{title}: {format_result_line(result)}")
        print(f"metrics averaged {AVERAGING}; crop {result['protocol']['crop']}, "
              f"clamp [{args.min_depth:g}, {args.max_depth:g}] m; {seconds:.1f} s")
        for key, path in paths.items():
            print(f"  {key}: {path}")
        if args.save_predictions:
            print(f"  predictions: {output_dir / 'predictions'}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
