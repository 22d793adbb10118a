#!/usr/bin/env python
"""Depth for a whole dataset: every image of a dataset labelled with metric depth, written as a Parquet dataset.

    python examples/predict_dataset.py --model MODEL --dataset path/to/images --output_dir out/depth
    accelerate launch --num_processes 8 examples/predict_dataset.py --model MODEL --dataset user/dataset \\
        --output_dir out/depth --batch_size 32 --dtype bfloat16 --push_to_hub user/dataset-depth

Input (`--dataset`): an image folder, a `save_to_disk` folder, a depth dataset `load_depth_dataset` reads, or a Hub
dataset id (`--dataset_config`, `--split`, `--streaming`); the image column is found when there is one
(`--image_column` otherwise). Output (`--output_dir`): Parquet shards under `data/` with the input's columns kept,
`row_index`, and the depth (`--depth_format png16`: uint16 millimetre PNG; `float16`: metres), plus `uncertainty`
when the model predicts it. Read it back with `datasets.load_dataset(OUTPUT_DIR)` or
`datasets.load_dataset("parquet", data_files=f"{OUTPUT_DIR}/data/*.parquet")`.

Several processes (`accelerate launch --num_processes N`, on GPUs or machines sharing the output folder) share the
shards still to do. A shard (`--shard_size` rows, by row index) is written atomically when complete, so a run stopped
at any moment and started again with the same command, with any number of processes, finishes the rest with every
row exactly once.
A folder holding a run with other settings is refused unless `--overwrite`. Unreadable images are listed in
`errors.jsonl` (row index and reason) and counted in `summary.json`; they do not stop the run.

The steps are in `modeling_moa_depthclip.inference.dataset_prediction`. Exit status 2: bad arguments, or a model,
dataset or output folder that cannot be used (one line naming it).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning (several processes share the CPUs).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

REPO_ROOT = Path(__file__).resolve().parents[1]
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(1, str(REPO_ROOT))

import datasets  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import gather_object  # noqa: E402
from transformers import HfArgumentParser  # noqa: E402

from modeling_moa_depthclip.inference.dataset_prediction import (  # noqa: E402
    DEPTH_FORMATS,
    DTYPES,
    DatasetPredictionError,
    PredictionOutput,
    ShardPlan,
    ShardPredictor,
    SharedProgress,
    check_output_columns,
    load_inference_model,
    map_style_rows,
    open_input,
    predicts_uncertainty,
    push_folder_to_hub,
    stream_rows,
)
from modeling_moa_depthclip.loading import ModelLoadError  # noqa: E402
from modeling_moa_depthclip.utils import first_line, is_hub_id  # noqa: E402

PROG = Path(__file__).name


@dataclass
class ModelArguments:
    model: str = field(metadata={"help": "saved model folder or Hugging Face Hub id"})
    dtype: str = field(default="float32", metadata={"choices": DTYPES, "help": "precision of weights and activations"})

    def __post_init__(self):
        if not self.model.strip():
            raise ValueError("--model is empty")


@dataclass
class DataArguments:
    dataset: str = field(metadata={"help": "image folder, save_to_disk folder, depth dataset or Hub dataset id"})
    split: str = field(default="train", metadata={"help": "split of the dataset"})
    dataset_config: str | None = field(default=None, metadata={"help": "configuration of a Hub dataset"})
    image_column: str | None = field(
        default=None, metadata={"help": "image column (found when the dataset has exactly one)"}
    )
    streaming: bool = field(default=False, metadata={"help": "read the dataset as a stream (nothing downloaded first)"})

    def __post_init__(self):
        if not self.dataset.strip():
            raise ValueError("--dataset is empty")


@dataclass
class OutputArguments:
    output_dir: str = field(metadata={"help": "folder of the output dataset (resumed when it holds this run)"})
    depth_format: str = field(
        default="png16", metadata={"choices": DEPTH_FORMATS, "help": "png16: uint16 millimetres; float16: metres"}
    )
    depth_column: str = field(default="depth", metadata={"help": "name of the predicted depth column"})
    shard_size: int = field(default=1000, metadata={"help": "rows per output shard (the unit of resuming)"})
    overwrite: bool = field(default=False, metadata={"help": "replace the results of a run already in --output_dir"})
    push_to_hub: str | None = field(default=None, metadata={"help": "Hub dataset repository to upload the result to"})
    private: bool = field(default=False, metadata={"help": "create the Hub repository private"})

    def __post_init__(self):
        if self.shard_size <= 0:
            raise ValueError(f"--shard_size must be a positive integer, got {self.shard_size}")
        if not self.depth_column.strip():
            raise ValueError("--depth_column is empty")
        if self.push_to_hub is not None and not is_hub_id(self.push_to_hub):
            raise ValueError(f"--push_to_hub {self.push_to_hub!r} is not a Hub repository id (name or namespace/name)")


@dataclass
class RunArguments:
    batch_size: int = field(default=8, metadata={"help": "images per forward pass"})
    num_workers: int = field(
        default=2, metadata={"help": "DataLoader workers reading and decoding images, per process (a stream is read "
                             "by the process itself)"}
    )
    cpu: bool = field(default=False, metadata={"help": "run on the CPU even if an accelerator is available"})

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"--batch_size must be a positive integer, got {self.batch_size}")
        if self.num_workers < 0:
            raise ValueError(f"--num_workers must be >= 0, got {self.num_workers}")


class OneLineParser(HfArgumentParser):
    """Argument errors in one line (argparse adds the whole usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def parse_arguments(argv: Sequence[str] | None = None):
    parser = OneLineParser(
        (ModelArguments, DataArguments, OutputArguments, RunArguments), prog=PROG, description=__doc__.split("\n")[0]
    )
    try:
        return parser.parse_args_into_dataclasses(args=argv, look_for_args_file=False)
    except ValueError as error:  # a __post_init__ check
        parser.error(first_line(error))


def run_settings(model_args, data_args, output_args, rows) -> dict:
    """What a run computes: a restart into the same folder must have the same."""
    model = Path(model_args.model).expanduser()
    return {
        "model": str(model.resolve()) if model.exists() else model_args.model,
        "dtype": model_args.dtype,
        "dataset": rows.source,
        "dataset_config": data_args.dataset_config,
        "split": data_args.split,
        "streaming": data_args.streaming,
        "image_column": rows.image_column,
        "num_rows": rows.num_rows,
        "shard_size": output_args.shard_size,
        "depth_format": output_args.depth_format,
        "depth_column": output_args.depth_column,
    }


class RunRefused(Exception):
    """The run stops with one line and this exit code (the arguments, the input or the output folder)."""

    def __init__(self, message: str, code: int):
        super().__init__(message)
        self.code = code


def checked_inputs(model_args, data_args, output_args, accelerator):
    """1. Input, model and output folder, checked before anything is written."""
    try:
        rows = open_input(
            data_args.dataset, split=data_args.split, config_name=data_args.dataset_config,
            image_column=data_args.image_column, streaming=data_args.streaming, depth_format=output_args.depth_format,
        )
        settings = run_settings(model_args, data_args, output_args, rows)
        output = PredictionOutput(output_args.output_dir)
        output.check(settings, output_args.overwrite)
        check_output_columns(rows, output_args.depth_column, with_uncertainty=False)
        model, image_processor = load_inference_model(model_args.model, model_args.dtype, accelerator.device)
        with_uncertainty = predicts_uncertainty(model, image_processor)
        check_output_columns(rows, output_args.depth_column, with_uncertainty)
    except (DatasetPredictionError, ModelLoadError) as error:
        raise RunRefused(first_line(error), 2) from None
    return rows, settings, output, model, image_processor, with_uncertainty


def predict_pending_shards(accelerator, rows, output, predictor, plan, completed, progress, output_args, run_args):
    """3. Each process predicts its share of the shards still to do and commits each shard when complete; returns
    the number of rows of the input."""
    if rows.num_rows is not None:
        pending = plan.pending(completed)
        with accelerator.split_between_processes(pending) as shards:
            predictor.run(
                map_style_rows(rows, shards, plan, output_args.depth_format, run_args.batch_size, run_args.num_workers),
                plan.shard_of,
            )
        progress.wait_for(pending)
        return rows.num_rows

    def take(todo):
        with accelerator.split_between_processes(todo) as mine:
            return list(mine)

    counter = {}
    predictor.run(
        stream_rows(rows, plan, completed, output_args.depth_format, accelerator.num_processes, take, counter),
        plan.shard_of,
    )
    progress.wait_for(ShardPlan(output_args.shard_size, counter["rows"]).pending(completed), num_rows=counter["rows"])
    return counter["rows"]


def write_summary(output, settings, processes, completed, num_rows, seconds, shard_size, num_processes) -> dict:
    """4. On the main process: every shard is complete, then the summary, the errors and the card are written."""
    all_shards = set(range(ShardPlan(shard_size, num_rows).num_shards))
    missing = sorted(all_shards - output.completed_shards())
    if missing:
        raise RunRefused(f"shards {missing[:5]} are not complete", 1)
    errors = output.errors()
    done_now = sum(process["rows"] for process in processes)
    summary = {
        "settings": settings,
        "total_rows": num_rows,
        "written_rows": output.written_rows(),
        "error_rows": len(errors),
        "num_shards": len(all_shards),
        "num_processes": num_processes,
        "this_run": {
            "rows": done_now,
            "shards_skipped": len(completed),
            "seconds": round(seconds, 3),
            "images_per_second": round(done_now / seconds, 2) if seconds > 0 else None,
            "processes": processes,
        },
    }
    output.finalize(summary, errors)
    print(
        f"{summary['total_rows']} rows: {summary['written_rows']} with depth, {summary['error_rows']} unreadable "
        f"(errors.jsonl); {done_now} done in this run by {num_processes} process(es) at "
        f"{summary['this_run']['images_per_second']} images/s; {len(completed)} shard(s) were already complete -> "
        f"{output.root}"
    )
    return summary


def push(output, output_args):
    try:
        url = push_folder_to_hub(output, output_args.push_to_hub, private=output_args.private)
    except Exception as error:  # network, authentication, permissions: reported in one line, results kept
        raise RunRefused(f"cannot push to {output_args.push_to_hub}: {first_line(error)}", 1) from None
    print(f"pushed to {url}")


def run(model_args, data_args, output_args, run_args, accelerator) -> int:
    rows, settings, output, model, image_processor, with_uncertainty = checked_inputs(
        model_args, data_args, output_args, accelerator
    )

    # 2. The folder records the settings; the shards already complete are skipped. Every process has checked the
    # folder before the main process writes to it.
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        output.prepare(settings, output_args.overwrite)
    accelerator.wait_for_everyone()
    completed = output.completed_shards()
    plan = ShardPlan(output_args.shard_size, rows.num_rows)
    progress = SharedProgress(output, plan, completed, enabled=accelerator.is_main_process)
    predictor = ShardPredictor(
        model, image_processor, rows, output, output_args.depth_column, output_args.depth_format,
        run_args.batch_size, with_uncertainty, on_progress=progress.update,
    )

    start = time.perf_counter()
    num_rows = predict_pending_shards(accelerator, rows, output, predictor, plan, completed, progress, output_args,
                                      run_args)  # fmt: skip
    seconds = time.perf_counter() - start

    accelerator.wait_for_everyone()
    processes = gather_object([{
        "process": accelerator.process_index, "shards": predictor.shards_written,
        "rows": predictor.rows_written + predictor.rows_failed, "seconds": round(seconds, 3),
    }])
    if accelerator.is_main_process:
        write_summary(output, settings, processes, completed, num_rows, seconds, output_args.shard_size,
                      accelerator.num_processes)  # fmt: skip
        if output_args.push_to_hub:
            push(output, output_args)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    model_args, data_args, output_args, run_args = parse_arguments(argv)
    accelerator = Accelerator(cpu=run_args.cpu)
    # one progress bar: ours (and an error stays one line)
    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    try:
        return run(model_args, data_args, output_args, run_args, accelerator)
    except RunRefused as refused:
        if accelerator.is_main_process:
            print(f"{PROG}: error: {refused}", file=sys.stderr)
        return refused.code
    finally:
        accelerator.end_training()


if __name__ == "__main__":
    sys.exit(main())
