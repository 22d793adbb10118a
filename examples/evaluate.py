#!/usr/bin/env python
"""Evaluate a MoA-DepthCLIP checkpoint on NYU Depth V2 (or any depth dataset) with the standard protocol.

    python examples/evaluate.py --model outputs/train/best
    accelerate launch --cpu --num_processes 2 examples/evaluate.py --model PATH --dataset ../shared/data/nyu_eigen_test_sample

Protocol (the one of the BTS / AdaBins / DenseDepth NYU evaluation code):

* the model predicts at its input size (`--input_size`, default: the checkpoint's image processor), the prediction is
  resized bilinearly to the ground truth's size (480x640 on NYU), optionally averaged with the prediction of the
  horizontally flipped image (`--flip_average`);
* predictions are clamped to [min_depth, max_depth] of the model's config ([1e-3, 10] m for the NYU models;
  `--min_depth`/`--max_depth` override it); ground-truth pixels outside (min_depth, max_depth] or not finite are
  invalid; only the Eigen crop (rows 45-471, cols 41-601 at 480x640) is scored by default (`--crop garg|eigen|none`);
  a frame without any valid pixel is skipped, and counted and named in the outputs;
* d1, d2, d3, abs_rel, sq_rel, rmse, rmse_log, log10, silog are computed per image on its valid pixels and then
  averaged over images (not over pixels).

Writes to `--output_dir` (checked before any work): `metrics.json` (the metrics, `num_images`, the skipped frames
and the `protocol`), `metrics.md`,
`per_image_metrics.csv`, `samples.png` (RGB | ground truth | prediction | absolute error for a few frames),
with `--save_predictions` one float32 `.npy` in metres per frame under `predictions/`, and with `--uncertainty` the
sparsification curves of the model's per-pixel uncertainty and their AUSE (AbsRel, RMSE) beside a random order in
`metrics.json` / `metrics.md` and `sparsification.png` (`modeling_moa_depthclip.evaluation.uncertainty`).

Under `accelerate launch` with several processes the frames are split between the processes without padding and
the per-image results are gathered and merged by frame name, so every frame is counted exactly once.

The work is done by `modeling_moa_depthclip.evaluation` (`load_model_and_processor`, `evaluate`,
`write_evaluation_outputs`), which `examples/train.py` uses too. Exit status 2: bad arguments, or a model, dataset
or output folder that cannot be used (one line naming it).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from pathlib import Path
from typing import Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a small CPU machine shared with
# another busy torch process, spinning threads made a ViT-B/32 training step (batch 8, 2 cores) take 10 s instead of
# 1.45 s; on an idle machine sleeping costs ~15 % (0.86 s instead of 0.74 s). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(1, str(REPO_ROOT))

from modeling_moa_depthclip.cli.arguments import positive_int  # noqa: E402
from modeling_moa_depthclip.evaluation import (
    # noqa: E402
    CROPS,
    check_output_dir,
    dataset_label,
    default_nyu_sample_dir,
    evaluate,
    format_report,
    load_dataset_or_error,
    write_evaluation_outputs,
)
from modeling_moa_depthclip.loading import ModelLoadError, load_config, load_model_and_processor


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.ArgumentParser, argparse.Namespace]:
    nyu = default_nyu_sample_dir()
    parser = argparse.ArgumentParser(
        prog=Path(__file__).name,
        description="Evaluate a MoA-DepthCLIP checkpoint with the standard NYU Depth V2 protocol.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument(
        "--model", default="outputs/train/best",
        help="checkpoint folder or Hub id (save_pretrained of MoADepthCLIPForDepthEstimation)",
    )
    parser.add_argument(
        "--dataset", default=str(nyu) if nyu else "synthetic",
        help="'synthetic', a DenseDepth/BTS folder or list, a fast-depth .h5 folder or .tar shards, DenseDepth's "
        "nyu_test.zip, a save_to_disk folder or a Hub dataset id "
        "(default: the shared NYU frames if present, else synthetic)",
    )
    parser.add_argument("--split", default="test", help="dataset split")
    parser.add_argument("--output_dir", default="outputs/evaluate", help="where metrics and pictures go")
    parser.add_argument("--save_predictions", action="store_true", help="save each prediction as float32 .npy (m)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per forward pass and process")
    parser.add_argument(
        "--input_size", type=positive_int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
        help="model input size (multiples of the patch size); default: the checkpoint's image processor",
    )
    parser.add_argument("--crop", choices=CROPS, default="eigen", help="evaluation crop")
    parser.add_argument("--flip_average", action="store_true", help="average with the horizontally flipped image")
    parser.add_argument("--min_depth", type=float, default=None,
                        help="clamp/valid range lower bound (m); default: the model's config.min_depth")
    parser.add_argument("--max_depth", type=float, default=None,
                        help="clamp/valid range upper bound (m); default: the model's config.max_depth")
    parser.add_argument("--num_samples", type=positive_int, default=None, help="evaluate only the first N frames")
    parser.add_argument(
        "--synthetic_size", type=positive_int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=(480, 640),
        help="frame size of synthetic scenes",
    )
    parser.add_argument("--num_visual_samples", type=int, default=4, help="frames in samples.png (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic scenes")
    parser.add_argument(
        "--uncertainty", action="store_true",
        help="also evaluate the per-pixel uncertainty (std of the depth bins): sparsification curves, AUSE for "
        "AbsRel and RMSE beside a random order (seeded by --seed), in metrics.json/metrics.md and sparsification.png",
    )
    return parser, parser.parse_args(argv)


def fail(parser: argparse.ArgumentParser, message: str):
    """One line on stderr, exit status 2."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def main(argv: Sequence[str] | None = None) -> dict:
    parser, args = parse_args(argv)
    output_dir = Path(args.output_dir)
    try:
        check_output_dir(output_dir)
        config = load_config(args.model)
    except ModelLoadError as error:
        hint = " (train one first with examples/train.py, or pass --model)" if args.model == "outputs/train/best" else ""
        fail(parser, f"--model: {error}{hint}")
    except OSError as error:
        fail(parser, f"--output_dir: {error}")
    min_depth = config.min_depth if args.min_depth is None else args.min_depth
    max_depth = config.max_depth if args.max_depth is None else args.max_depth
    if not 0 < min_depth < max_depth:
        fail(parser, f"need 0 < min_depth < max_depth, got {min_depth:g} and {max_depth:g} m")
    divisor = config.vision_config.patch_size
    if args.input_size is not None and (args.input_size[0] % divisor or args.input_size[1] % divisor):
        fail(parser, f"--input_size {args.input_size[0]} {args.input_size[1]}: both sides must be multiples of {divisor}")
    try:
        dataset = load_dataset_or_error(args.dataset, args.split, min_depth=min_depth, max_depth=max_depth,
                                        num_samples=args.num_samples, synthetic_size=args.synthetic_size, seed=args.seed)
    except ValueError as error:
        fail(parser, f"--dataset: {error}")

    from accelerate import Accelerator

    accelerator = Accelerator()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
        force=True,
    )
    try:
        model, image_processor = load_model_and_processor(args.model, device=accelerator.device)
    except ModelLoadError as error:
        fail(parser, f"--model: {error}")

    start = time.perf_counter()
    try:
        result = evaluate(
            model, image_processor, dataset, accelerator=accelerator, batch_size=args.batch_size, crop=args.crop,
            min_depth=min_depth, max_depth=max_depth, flip_average=args.flip_average,
            input_size=tuple(args.input_size) if args.input_size else None,
            predictions_dir=output_dir / "predictions" if args.save_predictions else None,
            num_visual_samples=args.num_visual_samples, dataset_name=f"{args.dataset} ({args.split})",
            model_name=args.model, uncertainty=args.uncertainty, uncertainty_seed=args.seed,
        )
    except ValueError as error:  # nothing could be scored
        fail(parser, str(error))
    seconds = time.perf_counter() - start
    if accelerator.is_main_process:
        title = f"{Path(str(args.model).rstrip('/')).name} on {dataset_label(args.dataset, args.split)}"
        paths = write_evaluation_outputs(result, output_dir, title)
        if args.save_predictions:
            paths["predictions"] = output_dir / "predictions"
        print(format_report(result, title, seconds, paths))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


if __name__ == "__main__":
    main()
