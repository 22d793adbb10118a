#!/usr/bin/env python
"""The paper's comparison: every ablation variant of one starting model, trained alike, evaluated alike.

    python examples/ablation.py                        # tiny configuration, synthetic rooms, offline, a few minutes
    python examples/ablation.py --model checkpoints/moa-depthclip-init --dataset sayakpaul/nyu_depth_v2 \
        --eval_dataset PATH/TO/nyu_test_654 --max_train_steps 20000 --output_dir outputs/ablation

Each variant of `modeling_moa_depthclip.training.ablation.ABLATION_VARIANTS` (or those named by `--variants`) is the starting
model (`--model FOLDER`, or `--config_name NAME` built with `--seed`) with a few configuration fields changed, keeping
every weight of the starting model that still fits. Every variant that trains is trained by `examples/train.py`,
run as a subprocess on the variant's initial folder with the same data, steps, seed and `--train_args`; the
zero-shot baseline is not trained. Each is then scored by `modeling_moa_depthclip.evaluation.evaluate` (the
function of `examples/evaluate.py`) on the same frames (`--eval_dataset`, split `--eval_split`), loaded once, in the
starting model's depth range.

Writes to `--output_dir`: `ablation.json` (one row per variant: `name`, `paper_row`, `trainable_parameters`,
`train_seconds` and the nine metrics), `ablation.md` (the table), `ablation.png` (δ1 and RMSE per variant) and, per
variant, `variants/NAME/` with its initial folder, training run and evaluation. A variant whose `result.json` exists
is not run again with `--resume`; an existing output folder is never replaced without `--overwrite`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Sequence

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as train.py and evaluate.py: idle OpenMP threads sleep

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation  # noqa: E402
from modeling_moa_depthclip.cli.arguments import (  # noqa: E402
    ArgumentValueError,
    check_pairs,
    check_values,
    exit_with_error,
    parse_settings,
)
from modeling_moa_depthclip.configuration_moa_depthclip import config_from_name  # noqa: E402
from modeling_moa_depthclip.evaluation import CROPS, evaluate, load_dataset_or_error, write_evaluation_outputs  # noqa: E402
from modeling_moa_depthclip.evaluation.metrics import METRIC_KEYS  # noqa: E402
from modeling_moa_depthclip.loading import ModelLoadError, default_image_processor, load_model_and_processor  # noqa: E402
from modeling_moa_depthclip.training.ablation import ABLATION_VARIANTS, build_variant, variant_config  # noqa: E402


EXAMPLES_DIR = Path(__file__).resolve().parent
PROG = Path(__file__).name
RESULT_FILE = "result.json"
DEFAULT_CONFIG = "tiny"


@dataclass
class AblationArguments:
    """Train and evaluate the paper's ablation variants of one starting model with the same budget."""

    model: str | None = field(default=None, metadata={"help": (
        "starting checkpoint folder (e.g. a converted CLIP); not with --config_name")})
    config_name: str | None = field(default=None, metadata={"help": (
        f"without --model: 'default', 'paper', a name in examples/configs/ ('{DEFAULT_CONFIG}', the default) or a "
        "config JSON path; the starting model is built with --seed (its CLIP backbone is random)")})
    variants: list[str] = field(default_factory=lambda: list(ABLATION_VARIANTS), metadata={
        "choices": list(ABLATION_VARIANTS), "metavar": "NAME", "help": f"variants to run, of {list(ABLATION_VARIANTS)}"})
    dataset: str = field(default="synthetic", metadata={"help": "training data (any source train.py reads)"})
    eval_dataset: str | None = field(default=None, metadata={"help": "evaluation data (default: --dataset)"})
    eval_split: str = field(default="test", metadata={"help": "split of --eval_dataset every variant is scored on"})
    eval_crop: Literal[CROPS] = field(default="eigen", metadata={"help": "evaluation crop"})
    max_eval_samples: int = field(default=12, metadata={"help": "score only the first N frames (0: all of the split)"})
    max_train_steps: int = field(default=40, metadata={"help": "optimiser steps of every trained variant"})
    per_device_train_batch_size: int = 8
    seed: int = field(default=0, metadata={"help": "seed of the variants' new modules and of training"})
    synthetic_size: list[int] = field(default_factory=lambda: [120, 160], metadata={"metavar": "PIXELS", "help": (
        "HEIGHT WIDTH: frame size of synthetic scenes, training and evaluation")})
    train_args: str = field(default="", metadata={"metavar": "'ARGS'", "help": (
        "further examples/train.py flags for every variant, quoted as one string, e.g. \"--max_train_samples 200 "
        "--mixed_precision bf16\"")})
    output_dir: str = "outputs/ablation"
    overwrite: bool = field(default=False, metadata={"help": "replace an existing --output_dir"})
    resume: bool = field(default=False, metadata={"help": "keep the variants already finished in --output_dir"})

    def __post_init__(self):
        check_pairs(self, "synthetic_size")
        check_values(self, positive_int=("max_train_steps", "per_device_train_batch_size", "synthetic_size"),
                     non_negative_int=("max_eval_samples",))
        if self.model is not None and self.config_name is not None:
            raise ArgumentValueError("--config_name", "not allowed with --model")
        if self.model is None and self.config_name is None:
            self.config_name = DEFAULT_CONFIG
        if self.overwrite and self.resume:
            raise ArgumentValueError("--resume", "not allowed with --overwrite")
        unknown = [name for name in self.variants if name not in ABLATION_VARIANTS]
        if unknown:
            raise ArgumentValueError("--variants", f"unknown {unknown}; expected some of {list(ABLATION_VARIANTS)}")
        try:
            shlex.split(self.train_args)
        except ValueError as error:
            raise ArgumentValueError("--train_args", str(error)) from None


def prepare_output_dir(args: AblationArguments) -> Path:
    """--output_dir, emptied with --overwrite when it holds an earlier ablation; refused when it holds anything else."""
    output_dir = Path(args.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        raise ArgumentValueError("--output_dir", f"{output_dir} exists and is not a folder")
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.resume:
        if not args.overwrite:
            raise ArgumentValueError("--output_dir", f"{output_dir} is not empty: pass --overwrite to replace it or "
                                     "--resume")
        if not (output_dir / "variants").is_dir() and not (output_dir / "ablation.json").is_file():
            raise ArgumentValueError("--output_dir", f"refusing to replace {output_dir}: it does not look like an "
                                     "ablation output")
        shutil.rmtree(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    return output_dir


def starting_model(args: AblationArguments):
    """(model, image processor, description) of --model, or of --config_name built with --seed."""
    if args.model is not None:
        try:
            model, processor = load_model_and_processor(args.model)
        except ModelLoadError as error:
            raise ArgumentValueError("--model", str(error)) from None
        return model, processor, f"checkpoint {args.model}"
    try:
        config = config_from_name(args.config_name, EXAMPLES_DIR / "configs")
    except ValueError as error:
        raise ArgumentValueError("--config_name", str(error)) from None
    torch.manual_seed(args.seed)
    model = MoADepthCLIPForDepthEstimation(config)
    return model, default_image_processor(config), f"config {args.config_name} (random CLIP backbone, seed {args.seed})"


def evaluation_frames(args: AblationArguments, start):
    """The frames every variant is scored on, in the starting model's depth range."""
    try:
        return load_dataset_or_error(
            args.eval_dataset or args.dataset, args.eval_split, min_depth=start.config.min_depth,
            max_depth=start.config.max_depth, num_samples=args.max_eval_samples or None,
            synthetic_size=tuple(args.synthetic_size), seed=args.seed,
        )  # fmt: skip
    except ValueError as error:
        raise ArgumentValueError("--eval_dataset", str(error)) from None


def distinct_variants(args: AblationArguments, start) -> tuple[list[str], dict[str, str]]:
    """The variants to run, and those left out because their configuration is another's (e.g. multiscale_decoder
    of a multi-scale model would only repeat that run)."""
    variants, same_as, seen = [], {}, {}
    for name in dict.fromkeys(args.variants):
        try:
            key = json.dumps(variant_config(start.config, name).to_diff_dict(), sort_keys=True)
        except ValueError as error:
            raise ArgumentValueError("--variants", f"{name}: {error}") from None
        if key in seen:
            same_as[name] = seen[key]
            print(f"{name}: the same configuration as {seen[key]}, not run again")
            continue
        seen[key] = name
        variants.append(name)
    return variants, same_as


def run_logged(command: list[str], log_path: Path, what: str) -> float:
    """Run `command`, its output into `log_path`; returns the seconds it took. Exits naming the log on failure."""
    start = time.perf_counter()
    with open(log_path, "w") as log:
        completed = subprocess.run(command, stdout=log, stderr=subprocess.STDOUT, cwd=EXAMPLES_DIR.parent)
    seconds = time.perf_counter() - start
    if completed.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-15:])
        sys.exit(f"error: {what} failed (exit code {completed.returncode}); log {log_path}:\n{tail}")
    return seconds


def run_variant(name: str, start, processor, eval_data, args, variant_dir: Path) -> dict:
    variant = ABLATION_VARIANTS[name]
    model, fresh = build_variant(start, name, seed=args.seed)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    initial = variant_dir / "initial"
    model.save_pretrained(initial)
    processor.save_pretrained(initial)
    (variant_dir / "fresh_modules.json").write_text(json.dumps(fresh, indent=1) + "\n")
    synthetic = ["--synthetic_size", *map(str, args.synthetic_size)]

    train_seconds, final = 0.0, initial
    if variant.trains:
        command = [
            sys.executable, str(EXAMPLES_DIR / "train.py"), "--model", str(initial), "--dataset", args.dataset,
            "--max_train_steps", str(args.max_train_steps), "--seed", str(args.seed),
            "--per_device_train_batch_size", str(args.per_device_train_batch_size),
            "--eval_split", "none", "--test_datasets", "none", "--checkpointing_steps", "0", "--report_to", "none",
            "--output_dir", str(variant_dir / "train"), *synthetic, *shlex.split(args.train_args),
        ]  # fmt: skip
        train_seconds = run_logged(command, variant_dir / "train.log", f"training variant {name}")
        final = variant_dir / "train" / "final"

    trained, trained_processor = load_model_and_processor(final)
    result = evaluate(
        trained, trained_processor, eval_data, crop=args.eval_crop, min_depth=start.config.min_depth,
        max_depth=start.config.max_depth, num_visual_samples=2, dataset_name=eval_label(args), model_name=name,
        show_progress=False,
    )  # fmt: skip
    write_evaluation_outputs(result, variant_dir / "evaluation", f"{name} on {eval_label(args)}")
    evaluation = {**result["metrics"], "num_images": result["num_images"]}
    row = {
        "name": name,
        "paper_row": variant.paper_row,
        "trainable_parameters": trainable,
        "train_seconds": round(train_seconds, 1),
        **{key: float(evaluation[key]) for key in METRIC_KEYS},
        "num_images": evaluation["num_images"],
    }
    (variant_dir / RESULT_FILE).write_text(json.dumps(row, indent=2) + "\n")
    return row


def eval_label(args) -> str:
    return f"{args.eval_dataset or args.dataset} ({args.eval_split})"


def format_table(rows: list[dict]) -> str:
    header = "| variant | trainable params | train s | " + " | ".join(METRIC_KEYS) + " | stands for |"
    lines = [header, "|" + "---|" * (len(METRIC_KEYS) + 4)]
    for row in rows:
        values = " | ".join(f"{row[key]:.4f}" for key in METRIC_KEYS)
        lines.append(
            f"| {row['name']} | {row['trainable_parameters']:,} | {row['train_seconds']:.0f} | {values} | "
            f"{row['paper_row']} |"
        )
    return "\n".join(lines)


def plot_rows(rows: list[dict], path: Path, title: str) -> Path:
    import matplotlib  # optional dependency: only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [row["name"] for row in rows]
    figure, axes = plt.subplots(1, 2, figsize=(max(8, 1.1 * len(rows) + 4), 4.2))
    for axis, key, label in ((axes[0], "d1", "δ1 < 1.25 (higher is better)"), (axes[1], "rmse", "RMSE, m (lower is better)")):
        axis.bar(range(len(rows)), [row[key] for row in rows], color="tab:blue")
        axis.set_xticks(range(len(rows)), names, rotation=35, ha="right", fontsize=8)
        axis.set_title(label, fontsize=10)
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


def run_variants(args: AblationArguments, variants: list[str], start, processor, eval_data, output_dir: Path):
    """Every variant's row; with --resume a finished variant's saved row is reused."""
    rows = []
    progress = tqdm(variants, desc="ablation", unit="variant")
    for name in progress:
        progress.set_postfix(variant=name)
        variant_dir = output_dir / "variants" / name
        done = variant_dir / RESULT_FILE
        if args.resume and done.is_file():
            rows.append(json.loads(done.read_text()))
            continue
        if variant_dir.exists():
            shutil.rmtree(variant_dir)  # an unfinished run of this variant
        variant_dir.mkdir(parents=True)
        rows.append(run_variant(name, start, processor, eval_data, args, variant_dir))
    return rows


def write_results(args: AblationArguments, rows: list[dict], same_as: dict, description: str, output_dir: Path):
    """ablation.json, ablation.md and ablation.png, and the table on stdout."""
    eval_source = args.eval_dataset or args.dataset
    setup = {
        "start": description, "dataset": args.dataset, "eval_dataset": eval_source, "eval_split": args.eval_split,
        "max_train_steps": args.max_train_steps, "per_device_train_batch_size": args.per_device_train_batch_size,
        "seed": args.seed, "train_args": args.train_args, "synthetic_size": list(args.synthetic_size),
        "same_configuration_as": same_as,
    }  # fmt: skip
    (output_dir / "ablation.json").write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    title = f"{description}; {args.max_train_steps} steps on {args.dataset}; scored on {eval_source} ({args.eval_split})"
    notes = "".join(f"\n`{name}` has the same configuration as `{other}` here.\n" for name, other in same_as.items())
    (output_dir / "ablation.md").write_text(f"# Ablation\n\n{title}, {rows[0]['num_images']} frames.\n\n"
                                            f"{format_table(rows)}\n{notes}")  # fmt: skip
    plot_rows(rows, output_dir / "ablation.png", title)
    print(format_table(rows))
    print(f"wrote {output_dir / 'ablation.json'}, ablation.md and ablation.png")


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse_settings(AblationArguments, argv, PROG, AblationArguments.__doc__)
    try:  # every check before the output folder is touched
        start, processor, description = starting_model(args)
        eval_data = evaluation_frames(args, start)
        variants, same_as = distinct_variants(args, start)
        output_dir = prepare_output_dir(args)
    except ArgumentValueError as error:
        exit_with_error(PROG, error)
    rows = run_variants(args, variants, start, processor, eval_data, output_dir)
    write_results(args, rows, same_as, description, output_dir)
    return rows


if __name__ == "__main__":
    main()
