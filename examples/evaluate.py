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

Writes to `--output_dir` (checked before any work, created only once every argument is valid): `metrics.json` (the metrics, `num_images`, the skipped frames
and the `protocol`), `metrics.md`,
`per_image_metrics.csv`, `samples.png` (RGB | ground truth | prediction | absolute error for a few frames),
with `--save_predictions` one float32 `.npy` in metres per frame under `predictions/`, and with `--uncertainty` the
sparsification curves of the model's per-pixel uncertainty and their AUSE (AbsRel, RMSE) beside a random order in
`metrics.json` / `metrics.md` and `sparsification.png` (`modeling_moa_depthclip.evaluation.uncertainty`).

Under `accelerate launch` with several processes the frames are split between the processes without padding and
the per-image results are gathered and merged by frame name, so every frame is counted exactly once.

The work is done by `modeling_moa_depthclip.loading.load_model_and_processor` and
`modeling_moa_depthclip.evaluation` (`evaluate` with `EvaluationSettings`, `write_evaluation_outputs`), which
`examples/train.py` uses too. Exit status 2: bad arguments, or a model, dataset
or output folder that cannot be used (one line naming it).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a small CPU machine shared with
# another busy torch process, spinning threads made a ViT-B/32 training step (batch 8, 2 cores) take 10 s instead of
# 1.45 s; on an idle machine sleeping costs ~15 % (0.86 s instead of 0.74 s). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from accelerate import Accelerator  # noqa: E402

EXAMPLES_DIR = Path(__file__).resolve().parent
for _path in (EXAMPLES_DIR.parent, EXAMPLES_DIR):  # run from a checkout without installing the package
    if str(_path) not in sys.path:
        sys.path.insert(1, str(_path))

from modeling_moa_depthclip.cli.arguments import (  # noqa: E402
    ArgumentValueError,
    check_pairs,
    check_values,
    exit_with_error,
    parse_settings,
)
from modeling_moa_depthclip.evaluation import (  # noqa: E402
    CROPS,
    EvaluationSettings,
    check_output_dir,
    dataset_label,
    evaluate,
    format_report,
    load_dataset_or_error,
    nyu_sample_dir,
    write_evaluation_outputs,
)
from modeling_moa_depthclip.loading import ModelLoadError, load_config, load_model_and_processor  # noqa: E402
from modeling_moa_depthclip.uncertainty import has_depth_bins  # noqa: E402
from sample_data import NYU_SAMPLE_DIR  # noqa: E402

PROG = Path(__file__).name
DEFAULT_MODEL = "outputs/train/best"


def _default_dataset() -> str:
    nyu = nyu_sample_dir(NYU_SAMPLE_DIR)
    return str(nyu) if nyu else "synthetic"


@dataclass
class EvaluateArguments:
    """Evaluate a MoA-DepthCLIP checkpoint with the standard NYU Depth V2 protocol."""

    model: str = field(default=DEFAULT_MODEL, metadata={"help": (
        "checkpoint folder or Hub id (save_pretrained of MoADepthCLIPForDepthEstimation)")})
    dataset: str = field(default_factory=_default_dataset, metadata={"help": (
        "'synthetic', a DenseDepth/BTS folder or list, a fast-depth .h5 folder or .tar shards, DenseDepth's "
        "nyu_test.zip, a save_to_disk folder or a Hub dataset id (default: the shared NYU frames if present, else "
        "synthetic)")})
    split: str = field(default="test", metadata={"help": "dataset split"})
    output_dir: str = field(default="outputs/evaluate", metadata={"help": "where metrics and pictures go"})
    save_predictions: bool = field(default=False, metadata={"help": "save each prediction as float32 .npy (m)"})
    batch_size: int = field(default=8, metadata={"help": "images per forward pass and process"})
    input_size: list[int] | None = field(default=None, metadata={"metavar": "PIXELS", "help": (
        "HEIGHT WIDTH: model input size (multiples of the patch size); default: the checkpoint's image processor")})
    crop: Literal[CROPS] = field(default="eigen", metadata={"help": "evaluation crop"})
    flip_average: bool = field(default=False, metadata={"help": "average with the horizontally flipped image"})
    min_depth: float | None = field(default=None, metadata={"help": (
        "clamp/valid range lower bound (m); default: the model's config.min_depth")})
    max_depth: float | None = field(default=None, metadata={"help": (
        "clamp/valid range upper bound (m); default: the model's config.max_depth")})
    num_samples: int | None = field(default=None, metadata={"help": "evaluate only the first N frames"})
    synthetic_size: list[int] = field(default_factory=lambda: [480, 640], metadata={"metavar": "PIXELS", "help": (
        "HEIGHT WIDTH: frame size of synthetic scenes")})
    num_visual_samples: int = field(default=4, metadata={"help": "frames in samples.png (0: none)"})
    seed: int = field(default=0, metadata={"help": "seed of the synthetic scenes and of the random order"})
    uncertainty: bool = field(default=False, metadata={"help": (
        "also evaluate the per-pixel uncertainty (std of the depth bins): sparsification curves, AUSE for AbsRel and "
        "RMSE beside a random order (seeded by --seed), in metrics.json/metrics.md and sparsification.png")})

    def __post_init__(self):
        check_pairs(self, "input_size", "synthetic_size")
        check_values(self, positive_int=("batch_size", "input_size", "num_samples", "synthetic_size"),
                     non_negative_int=("num_visual_samples",), positive_float=("min_depth", "max_depth"))


def checked_inputs(args: EvaluateArguments):
    """(model config, depth range, dataset) once every argument is known to be usable; nothing is created before."""
    try:
        check_output_dir(args.output_dir, create=False)
    except OSError as error:
        raise ArgumentValueError("--output_dir", str(error)) from None
    try:
        config = load_config(args.model)
    except ModelLoadError as error:
        hint = " (train one first with examples/train.py, or pass --model)" if args.model == DEFAULT_MODEL else ""
        raise ArgumentValueError("--model", f"{error}{hint}") from None
    if args.uncertainty and not has_depth_bins(config):
        raise ArgumentValueError("--uncertainty", f"model {args.model} has no depth bins (head={config.head!r}), so "
                                 "no per-pixel uncertainty to evaluate")
    min_depth = config.min_depth if args.min_depth is None else args.min_depth
    max_depth = config.max_depth if args.max_depth is None else args.max_depth
    if not 0 < min_depth < max_depth:
        raise ArgumentValueError("--min_depth/--max_depth", f"need 0 < min_depth < max_depth, got {min_depth:g} and "
                                 f"{max_depth:g} m")
    divisor = config.vision_config.patch_size
    if args.input_size is not None and (args.input_size[0] % divisor or args.input_size[1] % divisor):
        raise ArgumentValueError("--input_size", f"{args.input_size[0]} {args.input_size[1]}: both sides must be "
                                 f"multiples of the patch size {divisor}")
    try:
        dataset = load_dataset_or_error(args.dataset, args.split, min_depth=min_depth, max_depth=max_depth,
                                        num_samples=args.num_samples, synthetic_size=args.synthetic_size, seed=args.seed)
    except ValueError as error:
        raise ArgumentValueError("--dataset", str(error)) from None
    return (min_depth, max_depth), dataset


def run(args: EvaluateArguments) -> dict:
    (min_depth, max_depth), dataset = checked_inputs(args)
    try:
        output_dir = check_output_dir(args.output_dir)
    except OSError as error:
        raise ArgumentValueError("--output_dir", str(error)) from None
    accelerator = Accelerator()
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
        force=True,
    )
    try:
        model, image_processor = load_model_and_processor(args.model, device=accelerator.device)
    except ModelLoadError as error:
        raise ArgumentValueError("--model", str(error)) from None
    settings = EvaluationSettings(
        batch_size=args.batch_size, crop=args.crop, min_depth=min_depth, max_depth=max_depth,
        flip_average=args.flip_average, input_size=args.input_size, num_visual_samples=args.num_visual_samples,
        predictions_dir=output_dir / "predictions" if args.save_predictions else None,
        dataset_name=f"{args.dataset} ({args.split})", model_name=args.model,
        uncertainty=args.uncertainty, uncertainty_seed=args.seed,
    )
    start = time.perf_counter()
    try:
        result = evaluate(model, image_processor, dataset, settings, accelerator=accelerator)
    except ValueError as error:  # nothing could be scored
        raise ArgumentValueError("--dataset", str(error)) from None
    if accelerator.is_main_process:
        title = f"{Path(str(args.model).rstrip('/')).name} on {dataset_label(args.dataset, args.split)}"
        paths = write_evaluation_outputs(result, output_dir, title)
        if args.save_predictions:
            paths["predictions"] = output_dir / "predictions"
        print(format_report(result, title, time.perf_counter() - start, paths))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv: Sequence[str] | None = None) -> dict:
    """Evaluate; exit status 2 with one line naming the argument when something cannot be used."""
    args = parse_settings(EvaluateArguments, argv, PROG, EvaluateArguments.__doc__)
    try:
        return run(args)
    except ArgumentValueError as error:
        exit_with_error(PROG, error)


if __name__ == "__main__":
    main()
