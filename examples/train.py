#!/usr/bin/env python
"""Fine-tune MoA-DepthCLIP for metric depth with accelerate, then evaluate it.

    accelerate launch --cpu --num_processes 1 examples/train.py          # the README's main job (a few minutes)
    python examples/train.py --model PATH --dataset sayakpaul/nyu_depth_v2 --max_train_steps 20000
    accelerate launch examples/train.py --resume_from_checkpoint latest  # continue an interrupted run exactly

With no flags it trains the default ViT-B/32 configuration on the built-in synthetic indoor scenes (a randomly
initialised CLIP backbone unless a pretrained CLIP is in the local Hugging Face cache, with a warning saying so),
then evaluates the best checkpoint on the synthetic test scenes and on the real NYU frames in
`../shared/data/nyu_eigen_test_sample` when present.

The recipe follows the paper: AdamW with two learning rates (1e-4 for the Mixture-of-Adapters, semantic context,
decoder and head; 1e-5 for the unfrozen CLIP blocks, i.e. every trainable `vision_model.*` parameter), weight
decay 0.01 except on biases and norms, batch 8, linear warm-up then cosine decay, mixed precision and gradient
accumulation through accelerate.

Layout of `--output_dir` (default `outputs/train`):

    train_args.json           the arguments (also marks the folder as this script's)
    .train.lock               held while a run trains here (one run per folder)
    checkpoints/step_N/       accelerate.save_state every --checkpointing_steps (the last --checkpoints_total_limit),
                              written as step_N.tmp/ and renamed once complete
    logs/                     TensorBoard: loss and its parts, learning rates, router usage, eval metrics
    best/                     model + image processor with the lowest eval --metric_for_best_model
    final/                    model + image processor after the last step
    eval/<dataset>/           metrics.json, metrics.md, per_image_metrics.csv, samples.png of the final evaluation
    metrics.json, metrics.md  the final evaluation of every test dataset, one row each
    loss_curve.png            training loss (and eval metric) against the step
"""

from __future__ import annotations

import argparse
import importlib.util
import contextlib
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a small CPU machine shared with
# another busy torch process, spinning threads made a ViT-B/32 training step (batch 8, 2 cores) take 10 s instead of
# 1.45 s; on an idle machine sleeping costs ~15 % (0.86 s instead of 0.74 s). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402


EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent
if str(REPO_ROOT) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(1, str(REPO_ROOT))


from modeling_moa_depthclip import (  # noqa: E402
    MoADepthCLIPConfig,
    MoADepthCLIPForDepthEstimation,
    MoADepthCLIPImageProcessor,
)
from modeling_moa_depthclip.cli.arguments import non_negative_int, positive_float, positive_int  # noqa: E402
from modeling_moa_depthclip.training.run_folder import (  # noqa: E402
    CheckpointError,
    GracefulInterrupt,
    NonFiniteGuard,
    NonFiniteTrainingError,
    OutputDirInUseError,
    TrainingProgress,
    earlier_outputs,
    first_example_with_valid_depth,
    gradient_norm,
    kill_point,
    lock_holder,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_model_folder,
    start_run,
)
from modeling_moa_depthclip.clip.initialization import init_from_clip  # noqa: E402
from modeling_moa_depthclip.configuration_moa_depthclip import config_from_name  # noqa: E402
from modeling_moa_depthclip.data import (  # noqa: E402
    DepthAugmentation,
    DepthCollator,
    SourceKind,
    TrainingExamples,
    classify_source,
    default_num_workers,
)
from modeling_moa_depthclip.evaluation import (
    # noqa: E402
    AVERAGING,
    dataset_label,
    default_nyu_sample_dir,
    evaluate,
    load_dataset_or_error,
    write_evaluation_outputs,
)
from modeling_moa_depthclip.loading import ModelLoadError, load_config, load_model_and_processor
from modeling_moa_depthclip.evaluation.metrics import format_metrics_markdown  # noqa: E402
from modeling_moa_depthclip.training.optimization import create_lr_scheduler, default_warmup_steps, parameter_groups  # noqa: E402
from modeling_moa_depthclip.visualization import plot_loss_curve  # noqa: E402


logger = logging.getLogger("moa_depthclip.train")

CONFIG_NAMES = ("default", "paper", "tiny")
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
RUN_MARKER = "train_args.json"
SCRIPT_ID = "moa-depthclip examples/train.py"
# The README's main command (no flags) must finish in a few minutes on 2 CPU cores: see --max_train_steps.
DEFAULT_MAX_TRAIN_STEPS = 150


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"{Path(__file__).name}",
        description="Fine-tune MoA-DepthCLIP (CLIP ViT-B/32 + prompt-guided Mixture-of-Adapters) for metric depth.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    model = parser.add_argument_group("model")
    model.add_argument("--model", default=None, help="checkpoint folder or Hub id to start from (a converted model)")
    model.add_argument(
        "--config_name", default="default",
        help="without --model: build from 'default' (ViT-B/32, multi-scale decoder), 'paper' (the authors' 7x7 "
        "patch-grid decoder), 'tiny' (examples/configs/tiny.json) or a config JSON path",
    )
    model.add_argument(
        "--clip_model", default=DEFAULT_CLIP,
        help="without --model: pretrained CLIP whose vision tower, visual projection and prompt text features "
        "initialise the model: a Hub id (looked up in the local cache only, never downloaded), a CLIPModel folder, "
        "an OpenAI or open_clip weights file; if absent the CLIP backbone is randomly initialised (with a warning)",
    )
    model.add_argument("--gradient_checkpointing", action="store_true", help="recompute CLIP blocks in backward")

    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset", default="synthetic",
        help="'synthetic' (built-in rendered rooms), a DenseDepth/BTS folder or list, a fast-depth .h5 folder or .tar "
        "shards, DenseDepth's nyu_test.zip, a save_to_disk folder or a Hub id",
    )
    data.add_argument("--train_split", default="train")
    data.add_argument(
        "--eval_split", default=None,
        help="split for periodic evaluation and best-model selection; default: 'validation' for synthetic and Hub "
        "datasets (falling back to 'test'), 'test' for local folders; 'none' disables it",
    )
    data.add_argument(
        "--test_datasets", nargs="*", default=None,
        help="final evaluation after training, each 'SOURCE' or 'SOURCE:SPLIT'; default: the training dataset's "
        "test split and the shared NYU frames (../shared/data/nyu_eigen_test_sample) if present; 'none' skips it",
    )
    data.add_argument("--max_train_samples", type=positive_int, default=None,
                      help="use the first N training examples (synthetic: N scenes; default 200)")
    data.add_argument("--max_eval_samples", type=positive_int, default=None,
                      help="use the first N eval examples (synthetic default 24)")
    data.add_argument(
        "--input_size", type=positive_int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=None,
        help="model input size (multiples of the patch size); default: the checkpoint's image processor, or "
        "image_size x image_size of the config (224x224 for ViT-B/32)",
    )
    data.add_argument(
        "--labels_at_native_resolution", action="store_true",
        help="keep the ground truth at the dataset's resolution (the model resizes its prediction to it) instead "
        "of resizing it to the input size with nearest neighbour",
    )
    data.add_argument(
        "--synthetic_size", type=positive_int, nargs=2, metavar=("HEIGHT", "WIDTH"), default=(240, 320),
        help="render size of synthetic training/validation scenes (the synthetic test split is rendered at 480x640)",
    )
    data.add_argument("--no_augmentation", action="store_true", help="train without DepthAugmentation")
    data.add_argument("--dataloader_num_workers", type=non_negative_int, default=default_num_workers(),
                      help="data loader processes (default for this machine: %(default)s)")

    optim = parser.add_argument_group("optimisation")
    optim.add_argument("--per_device_train_batch_size", type=positive_int, default=8)
    optim.add_argument("--per_device_eval_batch_size", type=positive_int, default=8)
    optim.add_argument("--learning_rate", type=positive_float, default=1e-4,
                       help="MoA, semantic context, decoder and head")
    optim.add_argument("--backbone_learning_rate", type=positive_float, default=1e-5,
                       help="unfrozen CLIP blocks (vision_model.*)")
    optim.add_argument("--weight_decay", type=float, default=0.01, help="AdamW weight decay (not on biases/norms)")
    optim.add_argument("--max_grad_norm", type=float, default=1.0, help="gradient clipping (0 disables)")
    optim.add_argument(
        "--max_train_steps", type=positive_int, default=None,
        help=f"optimizer steps; overrides --num_train_epochs; default {DEFAULT_MAX_TRAIN_STEPS} when neither is given",
    )
    optim.add_argument("--num_train_epochs", type=positive_int, default=None)
    optim.add_argument("--gradient_accumulation_steps", type=positive_int, default=1)
    optim.add_argument(
        "--lr_scheduler_type", default="cosine",
        choices=["cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial"],
        help="transformers get_scheduler name (after linear warm-up)",
    )
    optim.add_argument("--num_warmup_steps", type=non_negative_int, default=None,
                       help="linear warm-up steps; default 5%% of the training steps")
    optim.add_argument("--mixed_precision", choices=["no", "bf16", "fp16"], default=None,
                       help="passed to Accelerator; default: accelerate launch's setting")
    optim.add_argument("--seed", type=int, default=42)
    optim.add_argument(
        "--on_nonfinite", choices=["error", "skip"], default="error",
        help="a step with a non-finite loss or gradient: stop the run naming the step ('error'), or drop that update "
        "and go on ('skip'); non-finite weights are never saved either way",
    )

    run = parser.add_argument_group("checkpoints, evaluation, logging")
    run.add_argument("--output_dir", default="outputs/train")
    run.add_argument("--overwrite_output_dir", action="store_true",
                     help="write into a non-empty --output_dir that is not from a previous run of this script, or "
                     "replace the checkpoints, best/ and final/ of an earlier run there")
    run.add_argument("--checkpointing_steps", type=non_negative_int, default=100,
                     help="accelerate.save_state every N steps into output_dir/checkpoints/step_N (0: never)")
    run.add_argument("--checkpoints_total_limit", type=non_negative_int, default=2,
                     help="keep only the last N checkpoints (0: keep all)")
    run.add_argument("--resume_from_checkpoint", default=None,
                     help="'latest' (the newest complete one in output_dir/checkpoints; incomplete ones are skipped "
                     "with a warning) or a step_N folder")
    run.add_argument(
        "--stop_after_steps", type=positive_int, default=None,
        help="end this run after this many steps (counted from the start of training), saving a checkpoint and "
        "skipping the final evaluation: for time-boxed jobs; the schedule still follows --max_train_steps",
    )
    run.add_argument("--eval_steps", type=non_negative_int, default=50,
                     help="evaluate on the eval split every N steps and after the last step (0: only after the last)")
    run.add_argument("--metric_for_best_model", choices=["abs_rel", "rmse"], default="abs_rel")
    run.add_argument("--eval_crop", choices=["eigen", "garg", "none"], default="eigen")
    run.add_argument("--flip_average", action="store_true", help="flip averaging in the final evaluation")
    run.add_argument("--final_eval_model", choices=["best", "final"], default="best",
                     help="which weights the final evaluation scores")
    run.add_argument("--report_to", choices=["tensorboard", "none"], default="tensorboard",
                     help="TensorBoard logging (skipped with a notice if tensorboard is not installed)")
    run.add_argument("--num_visual_samples", type=non_negative_int, default=4, help="frames per samples.png")
    return parser


def parse_test_datasets(values: Sequence[str] | None, args) -> list[tuple[str, str]]:
    if values is not None and [v.lower() for v in values] in (["none"], []):
        return []
    if values is None:
        specs = [(args.dataset, "test")]
        nyu = default_nyu_sample_dir()
        if nyu is not None and _same_path(args.dataset, nyu) is False:
            specs.append((str(nyu), "test"))
        return specs
    specs = []
    for value in values:
        source, _, split = value.rpartition(":") if ":" in value and not os.path.exists(value) else (value, "", "")
        specs.append((source, split or "test"))
    return specs


def _same_path(a, b) -> bool:
    try:
        return os.path.exists(a) and os.path.samefile(a, b)
    except OSError:
        return False


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def build_config(config_name: str) -> MoADepthCLIPConfig:
    return config_from_name(config_name, EXAMPLES_DIR / "configs")


def fail(parser, message: str):
    """One line on stderr, exit status 2 (argparse's usage block would bury a loading error)."""
    parser.exit(2, f"{parser.prog}: error: {message}\n")


def model_config(args, parser) -> MoADepthCLIPConfig:
    """The config of the model to train (--model's, else --config_name's): the depth range of the data comes from it."""
    if args.model is not None:
        try:
            return load_config(args.model)
        except ModelLoadError as error:
            fail(parser, f"--model: {error}")
    try:
        return build_config(args.config_name)
    except ValueError as error:
        fail(parser, f"--config_name: {error}")


def load_or_build_model(args, parser, config: MoADepthCLIPConfig):
    """(model, image_processor, description) from --model, or from `config` (+ a local CLIP if available)."""
    if args.model is not None:
        try:
            model, image_processor = load_model_and_processor(args.model)
        except ModelLoadError as error:
            fail(parser, f"--model: {error}")
        model.apply_trainable_mask()
        return model, image_processor, f"checkpoint {args.model}"
    model = MoADepthCLIPForDepthEstimation(config)
    size = config.vision_config.image_size
    image_processor = MoADepthCLIPImageProcessor(
        size={"height": size, "width": size}, size_divisor=config.vision_config.patch_size
    )
    explicit = args.clip_model != DEFAULT_CLIP
    loaded = None
    try:
        loaded = init_from_clip(model, args.clip_model, local_files_only=True).describe()
    except OSError as error:  # not in the local cache or not a CLIP checkpoint: the warning below, unless asked for
        if explicit and os.path.exists(os.path.expanduser(args.clip_model)):
            parser.error(f"--clip_model {args.clip_model}: cannot read a CLIP checkpoint from it ({error})")
    except ValueError as error:  # found, but it does not fit the config or has no tokenizer
        if explicit:
            parser.error(f"--clip_model {args.clip_model}: {error}")
    if loaded:
        logger.info(f"initialised the {loaded}")
        return model, image_processor, f"config {args.config_name} + pretrained CLIP {args.clip_model}"
    logger.warning(
        "WARNING: no pretrained CLIP available locally (%s is not in the Hugging Face cache or does not match the "
        "'%s' config): the CLIP backbone of the model is RANDOMLY INITIALISED. Depth quality will be far below the "
        "paper's; pass --model with a converted checkpoint or --clip_model with a local CLIP for real fine-tuning.",
        args.clip_model, args.config_name,
    )
    return model, image_processor, f"config {args.config_name} (random CLIP backbone)"


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------


class EpochShuffleSampler(Sampler):
    """A seeded random order per epoch, reproducible from `(seed, epoch)` alone.

    Yields `epoch * n + index` so the dataset knows the epoch of each draw (and seeds its augmentation with it)
    even inside DataLoader workers; accelerate's `DataLoaderShard.set_epoch` reaches `set_epoch` here.
    """

    def __init__(self, num_examples: int, seed: int, shuffle: bool = True):
        self.num_examples, self.seed, self.shuffle, self.epoch = num_examples, seed, shuffle, 0

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __iter__(self):
        order = np.arange(self.num_examples)
        if self.shuffle:
            order = np.random.default_rng([self.seed, self.epoch]).permutation(self.num_examples)
        offset = self.epoch * self.num_examples
        return iter((offset + order).tolist())

    def __len__(self):
        return self.num_examples


def resolve_eval_split(source: str, requested: str | None) -> list[str]:
    if requested is not None:
        return [] if requested.lower() == "none" else [requested]
    if classify_source(source) is SourceKind.SYNTHETIC:
        return ["validation"]
    return ["validation", "test"]


# ------------------------------------------------------------------------------------------------
# Training state, checkpoints, output folder
# ------------------------------------------------------------------------------------------------


def check_output_dir(args, parser) -> Path:
    output_dir = Path(args.output_dir).expanduser()
    if output_dir.exists() and not output_dir.is_dir():
        parser.error(f"--output_dir {output_dir} exists and is not a folder")
    holder = lock_holder(output_dir)
    if holder is not None:  # checked first: a live run's checkpoints are not "an earlier run"
        parser.error(
            f"--output_dir {output_dir} is in use by another training run (pid {holder.get('pid', '?')} on "
            f"{holder.get('host', '?')}); wait for it to end or choose another folder"
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        marker = output_dir / RUN_MARKER
        ours = False
        if marker.is_file():
            try:
                ours = json.loads(marker.read_text()).get("script") == SCRIPT_ID
            except (OSError, json.JSONDecodeError):
                ours = False
        if not ours:
            parser.error(
                f"--output_dir {output_dir} is not empty and not from a previous run of this script; "
                "choose another folder or pass --overwrite_output_dir"
            )
    return output_dir


def resolve_resume(args, parser, output_dir: Path) -> Path | None:
    """The checkpoint to resume from; refuses to replace an earlier run's results unless --overwrite_output_dir."""
    try:
        resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    except CheckpointError as error:
        parser.error(f"--resume_from_checkpoint {error}")
    replaced = earlier_outputs(output_dir, resume_path)
    if replaced and not args.overwrite_output_dir:
        shown = ", ".join(os.path.relpath(p, output_dir) for p in replaced)
        if resume_path is None:
            parser.error(
                f"--output_dir {output_dir} holds an earlier run ({shown}): continue it with "
                "--resume_from_checkpoint latest, or pass --overwrite_output_dir to replace it"
            )
        parser.error(
            f"--resume_from_checkpoint {resume_path}: {output_dir} holds newer checkpoints ({shown}) that this run "
            "would replace; pass --overwrite_output_dir to drop them, or resume into another --output_dir"
        )
    return resume_path


def resume_command(argv: Sequence[str] | None) -> str:
    """This run's command line with `--resume_from_checkpoint latest` (replacing any resume flag)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--resume_from_checkpoint":
            skip = True
        elif not item.startswith("--resume_from_checkpoint="):
            kept.append(item)
    launcher = ["accelerate", "launch"] if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ["python"]
    return shlex.join([*launcher, os.path.relpath(__file__), *kept, "--resume_from_checkpoint", "latest"])


# ------------------------------------------------------------------------------------------------
# The steps of a run
# ------------------------------------------------------------------------------------------------


def parse_args(parser, argv: Sequence[str] | None):
    args = parser.parse_args(argv)
    if args.max_train_steps is None and args.num_train_epochs is None:
        args.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
    if args.config_name not in CONFIG_NAMES and not os.path.isfile(os.path.expanduser(args.config_name)):
        parser.error(f"--config_name {args.config_name}: expected one of {list(CONFIG_NAMES)} or a config JSON file")
    if args.stop_after_steps is not None and args.max_train_steps is not None and args.stop_after_steps >= args.max_train_steps:
        parser.error("--stop_after_steps must be smaller than --max_train_steps")
    return args


def load_data(args, parser, config: MoADepthCLIPConfig) -> SimpleNamespace:
    """Training set, periodic evaluation set and the final test datasets, depth in the model's range."""
    load_kwargs = dict(synthetic_size=tuple(args.synthetic_size), seed=args.seed, min_depth=config.min_depth,
                       max_depth=config.max_depth)
    try:
        train = load_dataset_or_error(args.dataset, args.train_split, num_samples=args.max_train_samples, **load_kwargs)
    except ValueError as error:
        parser.error(f"--dataset: {error}")
    if not hasattr(train, "__len__"):
        parser.error(f"--dataset {args.dataset}: training needs a map-style dataset (not streaming)")
    eval_set, eval_split = None, None
    for split in resolve_eval_split(args.dataset, args.eval_split):
        try:
            eval_set = load_dataset_or_error(args.dataset, split, num_samples=args.max_eval_samples, **load_kwargs)
            eval_split = split
            break
        except ValueError as error:
            if args.eval_split is not None:
                parser.error(f"--eval_split: {error}")
    if eval_set is not None and args.dataset == "synthetic":
        # rendered scenes are cached (rendering is the slow part); file datasets are read at each evaluation
        eval_set = [eval_set[i] for i in range(len(eval_set))]
    test_specs = parse_test_datasets(args.test_datasets, args)
    for source, _ in test_specs:  # checked now, loaded after training
        try:
            missing = classify_source(source) is SourceKind.MISSING
        except ValueError as error:
            parser.error(f"--test_datasets: {error}")
        if missing:
            parser.error(f"--test_datasets: dataset folder or file not found: {source}")
    return SimpleNamespace(train=train, eval=eval_set, eval_split=eval_split, test_specs=test_specs)


def setup_accelerator(args, parser, output_dir: Path):
    """The Accelerator (TensorBoard when installed) and the logging of every process."""
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    log_with = None
    if args.report_to == "tensorboard":
        if importlib.util.find_spec("tensorboard") is not None or importlib.util.find_spec("tensorboardX") is not None:
            log_with = "tensorboard"
    try:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        )
    except (ValueError, RuntimeError) as error:
        parser.error(f"cannot set up accelerate: {str(error).splitlines()[0]}")
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
        force=True,
    )
    import transformers

    transformers.utils.logging.set_verbosity_warning() if accelerator.is_main_process else transformers.utils.logging.set_verbosity_error()
    if args.report_to == "tensorboard" and log_with is None:
        logger.info("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    return accelerator


def set_input_size(args, parser, model, image_processor) -> tuple[int, int]:
    """The model's input size (--input_size, else the image processor's), stored in the processor that is saved."""
    patch = model.config.vision_config.patch_size
    if args.input_size is not None:
        input_size = tuple(args.input_size)
    else:
        input_size = (int(image_processor.size["height"]), int(image_processor.size["width"]))
    if input_size[0] % patch or input_size[1] % patch:
        parser.error(f"--input_size {input_size[0]} {input_size[1]}: both sides must be multiples of the patch size {patch}")
    image_processor.size = {"height": int(input_size[0]), "width": int(input_size[1])}
    image_processor.size_divisor = patch
    return input_size


def enable_gradient_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logger.info("gradient checkpointing on: CLIP blocks are recomputed in the backward pass")


def require_valid_depth(args, parser, train_set, model):
    """Without a single valid depth pixel every loss term is 0: nothing would be learnt, yet a model would be saved."""
    if first_example_with_valid_depth(train_set, model.depth_loss.valid_mask) is None:
        parser.error(
            f"--dataset {args.dataset}: none of the {len(train_set)} training examples has a valid depth pixel "
            f"(finite, in ({model.config.min_depth:g}, {model.config.max_depth:g}] m, the model's depth range)"
        )


def take_output_dir(args, parser, accelerator, output_dir: Path, resume_path: Path | None, cleanup):
    """One run at a time in the folder (a lock), marked as ours; SIGINT/SIGTERM from here on end the run with a
    checkpoint. Returns the interrupt handler."""
    try:
        lock = start_run(accelerator, output_dir, resume_path, args.overwrite_output_dir)
    except OutputDirInUseError as error:
        parser.error(f"--output_dir {error}")
    if lock is not None:
        cleanup.callback(lock.release)
    interrupt = cleanup.enter_context(GracefulInterrupt())
    if accelerator.is_main_process:
        (output_dir / RUN_MARKER).write_text(json.dumps({"script": SCRIPT_ID, **vars(args)}, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return interrupt


def train_dataloader_for(args, train_set, image_processor, input_size) -> DataLoader:
    augmentation = None if args.no_augmentation else DepthAugmentation(output_size=None)
    # examples come out at the model input size: augmenting the full frame for the collator to resize costs ~6x more
    target_size = None if args.labels_at_native_resolution else input_size
    train_dataset = TrainingExamples(train_set, augmentation, args.seed, cache=args.dataset == "synthetic",
                                     target_size=target_size)
    return DataLoader(
        train_dataset, batch_size=args.per_device_train_batch_size,
        sampler=EpochShuffleSampler(len(train_dataset), args.seed),
        collate_fn=DepthCollator(image_processor, input_size, args.labels_at_native_resolution),
        num_workers=args.dataloader_num_workers,
    )


def plan_steps(args, parser, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, warm-up steps); fills in --max_train_steps from --num_train_epochs."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    if args.stop_after_steps is not None and args.stop_after_steps >= args.max_train_steps:
        parser.error("--stop_after_steps must be smaller than the number of training steps")
    num_warmup_steps = args.num_warmup_steps if args.num_warmup_steps is not None else default_warmup_steps(args.max_train_steps)
    return steps_per_epoch, num_warmup_steps


def start_trackers(args, accelerator):
    if accelerator.log_with:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in vars(args).items()}
        accelerator.init_trackers("moa_depthclip", config=hparams)


def log_setup(args, accelerator, model, description, data, input_size, steps_per_epoch, num_warmup_steps):
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"model: {description}; {num_trainable:,} trainable of {num_total:,} parameters; input {input_size[0]}x{input_size[1]}; "
        f"depth range [{model.config.min_depth:g}, {model.config.max_depth:g}] m"
    )
    logger.info(
        f"data: {args.dataset} ({args.train_split}: {len(data.train)} examples; eval: "
        f"{f'{data.eval_split}, {len(data.eval)} examples' if data.eval is not None else 'none'}); "
        f"{args.max_train_steps} steps of batch {args.per_device_train_batch_size} x {accelerator.num_processes} "
        f"process(es) x {args.gradient_accumulation_steps} accumulation; {steps_per_epoch} steps per epoch; "
        f"lr {args.learning_rate:g} (head) / {args.backbone_learning_rate:g} (CLIP blocks), warm-up {num_warmup_steps}, "
        f"{args.lr_scheduler_type}; mixed precision {accelerator.mixed_precision}"
    )


def step_log(stats: torch.Tensor, loss_names: list[str], moa_layers: list[int], lr_names: list[str], lrs) -> dict:
    """TensorBoard scalars of one optimizer step from `[loss, loss parts..., router usage...]` averaged over it."""
    log = {"train/loss": float(stats[0])}
    log.update({f"train/loss_{name}": float(v) for name, v in zip(loss_names, stats[1:1 + len(loss_names)])})
    router = stats[1 + len(loss_names):].view(len(moa_layers), -1) if moa_layers else None
    for position, layer in enumerate(moa_layers):
        for expert, value in enumerate(router[position].tolist()):
            log[f"router/layer{layer}/expert{expert}"] = value
    log.update({f"lr/{name}": lr for name, lr in zip(lr_names, lrs)})
    return log


def periodic_evaluation(args, accelerator, model, image_processor, data, input_size, progress, output_dir, step):
    """Evaluate on the eval split and keep the best model in best/; an evaluation that fails costs only itself."""
    if data.eval is None:
        return None
    metric = args.metric_for_best_model
    try:
        result = evaluate(
            accelerator.unwrap_model(model), image_processor, data.eval, accelerator=accelerator,
            batch_size=args.per_device_eval_batch_size, crop=args.eval_crop, input_size=input_size,
            num_visual_samples=0, dataset_name=f"{args.dataset} ({data.eval_split})", show_progress=False,
        )
    except (OSError, ValueError) as error:
        logger.warning(f"step {step}: evaluation on {data.eval_split} failed, training goes on without it: {error}")
        return None
    metrics = result["metrics"]
    progress.eval_history.append({"step": step, **metrics})
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    improved = math.isfinite(metrics[metric]) and (progress.best_metric is None or metrics[metric] < progress.best_metric)
    logger.info(
        f"step {step}: eval {data.eval_split} abs_rel {metrics['abs_rel']:.4f} rmse {metrics['rmse']:.4f} "
        f"d1 {metrics['d1']:.4f}" + (" (best so far: saved to best/)" if improved else "")
    )
    if improved:
        progress.best_metric, progress.best_step = float(metrics[metric]), step
        save_model_folder(accelerator, model, image_processor, output_dir / "best", {
            "step": step, "eval_split": data.eval_split, "metric_for_best_model": metric, "eval_metrics": metrics
        })
    return metrics


def train_loop(args, accelerator, model, optimizer, lr_scheduler, train_dataloader, progress, steps_per_epoch,
               output_dir: Path, evaluate_at, interrupt, cleanup) -> dict:
    """From `progress.global_step` to --max_train_steps (or --stop_after_steps, or a signal): logs every optimizer
    step, calls `evaluate_at(step)` every --eval_steps and after the last, checkpoints every --checkpointing_steps.
    Returns the seconds spent, and the signal and checkpoint that ended it early, if any."""
    from tqdm.auto import tqdm

    moa_layers = [int(i) for i in getattr(accelerator.unwrap_model(model), "moa", {})]  # blocks with a router, if any
    lr_names = [group["name"] for group in optimizer.param_groups]
    trainable_parameters = [p for p in model.parameters() if p.requires_grad]
    global_step = progress.global_step
    stop_at = min(args.stop_after_steps or args.max_train_steps, args.max_train_steps)
    epoch = global_step // steps_per_epoch
    skip_batches = (global_step % steps_per_epoch) * args.gradient_accumulation_steps
    progress_bar = tqdm(total=args.max_train_steps, initial=global_step, desc="train", unit="step",
                        disable=not accelerator.is_local_main_process)
    cleanup.callback(progress_bar.close)
    model.train()
    train_start = time.perf_counter()
    eval_seconds = 0.0
    window = {"loss": [], "components": [], "router": []}
    # fp16 gradient scaling skips overflowing steps itself: only its losses are checked
    guard = NonFiniteGuard(accelerator, args.on_nonfinite, check_gradients=accelerator.mixed_precision != "fp16")
    signum = checkpoint = None
    while global_step < stop_at:
        train_dataloader.set_epoch(epoch)
        loader = accelerator.skip_first_batches(train_dataloader, skip_batches) if skip_batches else train_dataloader
        skip_batches = 0
        for batch in loader:
            with accelerator.accumulate(model):
                outputs = model(pixel_values=batch["pixel_values"], labels=batch["labels"])
                loss = outputs.loss
                accelerator.backward(loss)
                window["loss"].append(loss.detach().float())
                update = True
                if accelerator.sync_gradients:
                    if args.max_grad_norm > 0:
                        grad_norm = accelerator.clip_grad_norm_(trainable_parameters, args.max_grad_norm)
                    else:
                        grad_norm = gradient_norm(trainable_parameters)
                    # one verdict for all processes (raises with --on_nonfinite error)
                    update = guard.step_is_finite(global_step + 1, window["loss"], grad_norm)
                if update:
                    optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            components = outputs.loss_components
            window["components"].append(torch.stack([components[k].float() for k in sorted(components)]))
            if outputs.router_probs is not None:
                window["router"].append(outputs.router_probs.detach().float().mean(dim=0))
            if not accelerator.sync_gradients:
                continue
            global_step += 1
            progress.global_step = global_step
            if not update:
                progress.skipped_steps.append(global_step)
            elif bad := [p for p in trainable_parameters if not torch.isfinite(p.detach()).all()]:
                names = {id(p): n for n, p in model.named_parameters()}
                raise NonFiniteTrainingError(
                    f"training diverged at step {global_step}: the update made {len(bad)} parameter(s) non-finite "
                    f"(first: {names[id(bad[0])]}); nothing of step {global_step} was saved (lower --learning_rate)"
                )
            kill_point("step", global_step)
            signum = interrupt.agreed(accelerator)
            stats = torch.cat([
                torch.stack(window["loss"]).mean().reshape(1),
                torch.stack(window["components"]).mean(dim=0),
                torch.stack(window["router"]).mean(dim=0).flatten() if window["router"] else loss.new_zeros(0),
            ])
            stats = accelerator.reduce(stats, reduction="mean").cpu()
            window = {"loss": [], "components": [], "router": []}
            step_loss = float(stats[0])
            progress.loss_history.append([global_step, step_loss])
            accelerator.log(step_log(stats, sorted(components), moa_layers, lr_names, lr_scheduler.get_last_lr()),
                            step=global_step)
            progress_bar.update(1)
            progress_bar.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)

            last = global_step >= args.max_train_steps
            if (args.eval_steps and global_step % args.eval_steps == 0) or last:
                eval_start = time.perf_counter()
                evaluate_at(global_step)
                eval_seconds += time.perf_counter() - eval_start
            stopping = (global_step >= stop_at or signum is not None) and not last
            if (args.checkpointing_steps and global_step % args.checkpointing_steps == 0) or stopping:
                checkpoint = save_checkpoint(accelerator, output_dir, global_step, progress, args.checkpoints_total_limit)
                logger.info(f"step {global_step}: saved state to {checkpoint}")
            if global_step >= stop_at or signum is not None:
                break
        if signum is not None:
            break
        epoch += 1
    progress_bar.close()
    interrupt.restore()  # from here on (final save and evaluation) Ctrl-C acts at once
    return {"train_seconds": time.perf_counter() - train_start, "periodic_eval_seconds": eval_seconds,
            "signum": signum, "checkpoint": checkpoint}


def exit_for_signal(accelerator, signum: int, message: str):
    if accelerator.is_main_process:
        print(f"\nStopped by {signal.Signals(signum).name} {message}", file=sys.stderr)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    raise SystemExit(128 + signum)


def final_evaluation(args, accelerator, model, image_processor, input_size, progress, output_dir: Path, test_specs):
    """Evaluate best/ (or final/) on every test dataset; eval/<dataset>/ gets its outputs. A dataset that cannot be
    loaded or scored is skipped with a warning: the trained model is saved already."""
    best = output_dir / "best"
    eval_dir = best if args.final_eval_model == "best" and best.is_dir() else output_dir / "final"
    eval_model = accelerator.unwrap_model(model)
    if eval_dir == best and progress.best_step != progress.global_step:
        eval_model, _ = load_model_and_processor(str(eval_dir), device=accelerator.device)
    results, written, timings = {}, {}, {}
    for source, split in test_specs:
        label = dataset_label(source, split)
        start = time.perf_counter()
        try:
            size = (480, 640) if source == "synthetic" else tuple(args.synthetic_size)
            dataset = load_dataset_or_error(source, split, synthetic_size=size, seed=args.seed,
                                            min_depth=eval_model.config.min_depth, max_depth=eval_model.config.max_depth)
            result = evaluate(
                eval_model, image_processor, dataset, accelerator=accelerator,
                batch_size=args.per_device_eval_batch_size, crop=args.eval_crop, flip_average=args.flip_average,
                input_size=input_size, num_visual_samples=args.num_visual_samples,
                dataset_name=f"{source} ({split})", model_name=str(eval_dir),
            )
        except (OSError, ValueError) as error:
            logger.warning(f"final evaluation skipped for {source}: {error}")
            continue
        results[label] = result
        timings[label] = time.perf_counter() - start
        if accelerator.is_main_process:
            written[label] = write_evaluation_outputs(result, output_dir / "eval" / label, f"{eval_dir.name} model on {label}")
    return SimpleNamespace(model_dir=eval_dir, config=eval_model.config, results=results, written=written,
                           timings=timings)


def write_report(args, output_dir: Path, progress, description: str, eval_split, final, summary: dict):
    """timings.json, the metrics.json/md of every test dataset, and the closing lines on stdout (main process)."""
    global_step = progress.global_step
    train_seconds, eval_seconds = summary["train_seconds"], summary["periodic_eval_seconds"]
    timings = {
        "training_s": round(train_seconds - eval_seconds, 1),
        "periodic_evaluation_s": round(eval_seconds, 1),
        "final_evaluation_s": {k: round(v, 1) for k, v in final.timings.items()},
        "total_s": round(summary["total_seconds"], 1),
    }
    (output_dir / "timings.json").write_text(json.dumps(timings, indent=2) + "\n")
    results = final.results
    if results:
        table = format_metrics_markdown({label: r["metrics"] for label, r in results.items()}, label="dataset")
        (output_dir / "metrics.json").write_text(json.dumps({
            "model": str(final.model_dir), "step": progress.best_step if final.model_dir.name == "best" else global_step,
            "results": {label: {**r["metrics"], "num_images": r["num_images"], "skipped_frames": r["skipped"],
                                "protocol": r["protocol"]} for label, r in results.items()},
        }, indent=2) + "\n")
        (output_dir / "metrics.md").write_text(
            f"# MoA-DepthCLIP: {final.model_dir.name} model ({description}, {global_step} steps)\n\n{table}\n\n"
            f"Crop {args.eval_crop}, prediction clamped to [{final.config.min_depth:g}, {final.config.max_depth:g}] m, "
            f"{AVERAGING}.\n"
        )
    print()
    print(f"Trained {global_step} steps in {train_seconds - eval_seconds:.0f} s (+ {eval_seconds:.0f} s periodic "
          f"evaluation); model: {description}")
    if results:
        print(f"Final evaluation of {final.model_dir} (metrics averaged per image; {args.eval_crop} crop):")
        print(table)
        for label, paths in final.written.items():
            skipped = len(results[label]["skipped"])
            print(f"  {label} ({results[label]['num_images']} images{f', {skipped} skipped' if skipped else ''}, "
                  f"{final.timings[label]:.0f} s): {paths['metrics_json'].parent}/ [metrics.json, metrics.md, "
                  f"per_image_metrics.csv{', samples.png' if 'samples_png' in paths else ''}]")
    if progress.best_step is not None:
        print(f"Best model: {output_dir / 'best'} (step {progress.best_step}, eval {eval_split} {args.metric_for_best_model} "
              f"{progress.best_metric:.4f})")
    print(f"Final model: {output_dir / 'final'}")
    if summary.get("loss_curve") is not None:
        print(f"Loss curve: {summary['loss_curve']}")
    if results:
        print(f"Summary: {output_dir / 'metrics.md'}, {output_dir / 'metrics.json'}")
    if (output_dir / "logs").is_dir():
        print(f"TensorBoard logs: {output_dir / 'logs'}  (tensorboard --logdir {output_dir / 'logs'})")
    print(f"Total time: {summary['total_seconds']:.0f} s")


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Train; exits 1 on divergence, 128 + signal number after SIGINT/SIGTERM (with a checkpoint), 2 on bad input."""
    try:
        with contextlib.ExitStack() as cleanup:  # lock, signal handlers, progress bar: released before the message
            return run(argv, cleanup)
    except NonFiniteTrainingError as error:
        print(f"{Path(__file__).name}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def run(argv: Sequence[str] | None, cleanup: contextlib.ExitStack) -> dict:
    parser = build_parser()
    args = parse_args(parser, argv)
    total_start = time.perf_counter()
    output_dir = check_output_dir(args, parser)
    resume_path = resolve_resume(args, parser, output_dir)
    # the model's config (its depth range) and the data first: bad inputs fail here, before anything is built
    config = model_config(args, parser)
    data = load_data(args, parser, config)
    accelerator = setup_accelerator(args, parser, output_dir)

    set_seed(args.seed)
    model, image_processor, description = load_or_build_model(args, parser, config)
    input_size = set_input_size(args, parser, model, image_processor)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    require_valid_depth(args, parser, data.train, model)
    interrupt = take_output_dir(args, parser, accelerator, output_dir, resume_path, cleanup)
    train_dataloader = train_dataloader_for(args, data.train, image_processor, input_size)
    optimizer = torch.optim.AdamW(
        parameter_groups(model, args.learning_rate, args.backbone_learning_rate, args.weight_decay),
        lr=args.learning_rate,
    )
    model, optimizer, train_dataloader = accelerator.prepare(model, optimizer, train_dataloader)
    steps_per_epoch, num_warmup_steps = plan_steps(args, parser, len(train_dataloader))
    lr_scheduler = accelerator.prepare(create_lr_scheduler(
        args.lr_scheduler_type, optimizer, num_warmup_steps, args.max_train_steps, accelerator.num_processes
    ))
    progress = TrainingProgress()
    start_trackers(args, accelerator)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        progress.load(resume_path)
        logger.info(f"resumed from {resume_path} at step {progress.global_step}")
    log_setup(args, accelerator, accelerator.unwrap_model(model), description, data, input_size, steps_per_epoch,
              num_warmup_steps)

    def evaluate_at(step):
        return periodic_evaluation(args, accelerator, model, image_processor, data, input_size, progress, output_dir, step)

    summary = train_loop(args, accelerator, model, optimizer, lr_scheduler, train_dataloader, progress,
                         steps_per_epoch, output_dir, evaluate_at, interrupt, cleanup)
    signum = summary.pop("signum")
    if signum is not None and progress.global_step < args.max_train_steps:
        exit_for_signal(accelerator, signum, f"after step {progress.global_step} (checkpoint {summary['checkpoint']}). "
                        f"Resume with:\n  {resume_command(argv)}")
    if accelerator.is_main_process:
        summary["loss_curve"] = plot_loss_curve(progress.loss_history, output_dir / "loss_curve.png",
                                                progress.eval_history, args.metric_for_best_model)
    summary.update(global_step=progress.global_step, output_dir=str(output_dir), loss_history=progress.loss_history,
                   eval_history=progress.eval_history, best_step=progress.best_step, best_metric=progress.best_metric,
                   skipped_steps=progress.skipped_steps)
    if progress.global_step < args.max_train_steps:
        logger.info(
            f"stopped after step {progress.global_step} of {args.max_train_steps} (--stop_after_steps); continue with "
            f"--resume_from_checkpoint latest --output_dir {output_dir}"
        )
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary

    info = {"step": progress.global_step, "model": description, "args": {k: str(v) for k, v in vars(args).items()}}
    save_model_folder(accelerator, model, image_processor, output_dir / "final", info)
    if signum is not None:  # the signal came during the last step: the model is complete, its evaluation is not run
        exit_for_signal(accelerator, signum, f"after the last step; final model: {output_dir / 'final'} "
                        "(final evaluation skipped)")
    summary["final_model"] = str(output_dir / "final")
    final_start = time.perf_counter()
    final = final_evaluation(args, accelerator, model, image_processor, input_size, progress, output_dir,
                             data.test_specs)
    # every rank reaches the process group's teardown together; a rank tearing down alone can hang at exit
    accelerator.wait_for_everyone()
    accelerator.end_training()
    summary.update(
        final_eval_seconds=time.perf_counter() - final_start,
        final_eval_timings=final.timings,
        results={label: {**r["metrics"], "num_images": r["num_images"]} for label, r in final.results.items()},
        total_seconds=time.perf_counter() - total_start,
    )
    if accelerator.is_main_process:
        write_report(args, output_dir, progress, description, data.eval_split, final, summary)
    return summary


if __name__ == "__main__":
    main()
