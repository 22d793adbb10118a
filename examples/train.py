#!/usr/bin/env python
"""Fine-tune MoA-DepthCLIP for metric depth with accelerate, then evaluate it.

    accelerate launch --cpu --num_processes 1 examples/train.py          # the README's main job (a few minutes)
    python examples/train.py --model PATH --dataset sayakpaul/nyu_depth_v2 --max_train_steps 20000
    accelerate launch examples/train.py --resume_from_checkpoint latest  # continue an interrupted run exactly

With no flags it trains the default ViT-B/32 configuration on the built-in synthetic indoor scenes (a randomly
initialised CLIP backbone unless a pretrained CLIP is in the local Hugging Face cache, with a warning saying so),
then evaluates the best checkpoint on the synthetic test scenes and on the real NYU frames in
`../shared/data/nyu_eigen_test_sample` (`examples/sample_data.py`; `$MOA_DEPTHCLIP_NYU_SAMPLE` overrides it) when
present.

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

import contextlib
import importlib.util
import json
import logging
import math
import os
import shlex
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Literal, Sequence

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning. On a small CPU machine shared with
# another busy torch process, spinning threads made a ViT-B/32 training step (batch 8, 2 cores) take 10 s instead of
# 1.45 s; on an idle machine sleeping costs ~15 % (0.86 s instead of 0.74 s). An explicit setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import ProjectConfiguration, set_seed  # noqa: E402
from torch.utils.data import DataLoader, Sampler  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402


EXAMPLES_DIR = Path(__file__).resolve().parent
REPO_ROOT = EXAMPLES_DIR.parent
for _path in (REPO_ROOT, EXAMPLES_DIR):  # run from a checkout without installing the package
    if str(_path) not in sys.path:
        sys.path.insert(1, str(_path))


from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation  # noqa: E402
from modeling_moa_depthclip.cli.arguments import (  # noqa: E402
    ArgumentValueError,
    check_pairs,
    check_values,
    exit_with_error,
    parse_settings,
)
from modeling_moa_depthclip.clip.initialization import init_from_clip  # noqa: E402
from modeling_moa_depthclip.configuration_moa_depthclip import config_from_name  # noqa: E402
from modeling_moa_depthclip.data import (  # noqa: E402
    DecodedFrames,
    DepthAugmentation,
    DepthCollator,
    SourceKind,
    TrainingExamples,
    classify_source,
    default_num_workers,
)
from modeling_moa_depthclip.evaluation import (  # noqa: E402
    AVERAGING,
    CROPS,
    EvaluationSettings,
    check_output_dir,
    dataset_label,
    evaluate,
    load_dataset_or_error,
    nyu_sample_dir,
    write_evaluation_outputs,
)
from modeling_moa_depthclip.evaluation.metrics import format_metrics_markdown  # noqa: E402
from modeling_moa_depthclip.loading import (  # noqa: E402
    ModelLoadError,
    default_image_processor,
    load_config,
    load_model_and_processor,
)
from modeling_moa_depthclip.training.launch import (  # noqa: E402
    launch_setup,
    launch_shortfall,
    requested_num_processes,
    resume_mismatch,
)
from modeling_moa_depthclip.training.optimization import (  # noqa: E402
    create_lr_scheduler,
    default_warmup_steps,
    parameter_groups,
)
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
    lock_holder,
    resolve_resume_checkpoint,
    save_checkpoint,
    save_model_folder,
    start_run,
)
from modeling_moa_depthclip.utils import first_line  # noqa: E402
from modeling_moa_depthclip.visualization import plot_loss_curve  # noqa: E402
from sample_data import NYU_SAMPLE_DIR  # noqa: E402


logger = logging.getLogger("moa_depthclip.train")

PROG = Path(__file__).name
DEFAULT_CLIP = "openai/clip-vit-base-patch32"
RUN_MARKER = "train_args.json"
SCRIPT_ID = "moa-depthclip examples/train.py"
# The README's main command (no flags) must finish in a few minutes on 2 CPU cores: see --max_train_steps.
DEFAULT_MAX_TRAIN_STEPS = 150
LR_SCHEDULERS = ("cosine", "linear", "constant_with_warmup", "cosine_with_restarts", "polynomial")


# ------------------------------------------------------------------------------------------------
# Arguments
# ------------------------------------------------------------------------------------------------


def _help(text: str) -> dict:
    return {"help": text}


@dataclass
class TrainArguments:
    """Fine-tune MoA-DepthCLIP (CLIP ViT-B/32 + prompt-guided Mixture-of-Adapters) for metric depth."""

    # model
    model: str | None = field(default=None, metadata=_help(
        "checkpoint folder or Hub id to start from (a converted model)"))
    config_name: str = field(default="default", metadata=_help(
        "without --model: build from 'default' (ViT-B/32, multi-scale decoder), 'paper' (the authors' 7x7 patch-grid "
        "decoder), 'tiny' (examples/configs/tiny.json) or a config JSON path"))
    clip_model: str = field(default=DEFAULT_CLIP, metadata=_help(
        "without --model: pretrained CLIP whose vision tower, visual projection and prompt text features initialise "
        "the model: a Hub id (looked up in the local cache only, never downloaded), a CLIPModel folder, an OpenAI or "
        "open_clip weights file; if absent the CLIP backbone is randomly initialised (with a warning)"))
    gradient_checkpointing: bool = field(default=False, metadata=_help("recompute CLIP blocks in backward"))
    # data
    dataset: str = field(default="synthetic", metadata=_help(
        "'synthetic' (built-in rendered rooms), a DenseDepth/BTS folder or list, a fast-depth .h5 folder or .tar "
        "shards, DenseDepth's nyu_test.zip, a save_to_disk folder or a Hub id"))
    train_split: str = "train"
    eval_split: str | None = field(default=None, metadata=_help(
        "split for periodic evaluation and best-model selection; default: 'validation' for synthetic and Hub "
        "datasets (falling back to 'test'), 'test' for local folders; 'none' disables it"))
    test_datasets: list[str] | None = field(default=None, metadata=_help(
        "final evaluation after training, each 'SOURCE' or 'SOURCE:SPLIT'; default: the training dataset's test "
        "split and the shared NYU frames (examples/sample_data.py, or $MOA_DEPTHCLIP_NYU_SAMPLE) if present; 'none' "
        "skips it"))
    max_train_samples: int | None = field(default=None, metadata=_help(
        "use the first N training examples (synthetic: N scenes; default 200)"))
    max_eval_samples: int | None = field(default=None, metadata=_help(
        "use the first N eval examples (synthetic default 24)"))
    input_size: list[int] | None = field(default=None, metadata={"metavar": "PIXELS", "help": (
        "HEIGHT WIDTH: model input size (multiples of the patch size); default: the checkpoint's image processor, "
        "or image_size x image_size of the config (224x224 for ViT-B/32)")})
    labels_at_native_resolution: bool = field(default=False, metadata=_help(
        "keep the ground truth at the dataset's resolution (the model resizes its prediction to it) instead of "
        "resizing it to the input size with nearest neighbour"))
    synthetic_size: list[int] = field(default_factory=lambda: [240, 320], metadata={"metavar": "PIXELS", "help": (
        "HEIGHT WIDTH: render size of synthetic training/validation scenes (the synthetic test split is rendered "
        "at 480x640)")})
    no_augmentation: bool = field(default=False, metadata=_help("train without DepthAugmentation"))
    decoded_cache_dir: str | None = field(default=None, metadata=_help(
        "decode the training frames of a file dataset once into this folder (about 2 MB per 640x480 frame) and read "
        "them back memory-mapped: several times more frames/s per loader worker. Off by default, as it copies the "
        "dataset decoded; entries are keyed by the source files and decoding settings, so the folder can be reused"))
    dataloader_num_workers: int = field(default_factory=default_num_workers, metadata=_help(
        "data loader processes (default: 0 on a machine of 1-2 cores, else half the cores, at most 8)"))
    # optimisation
    per_device_train_batch_size: int = 8
    per_device_eval_batch_size: int = 8
    learning_rate: float = field(default=1e-4, metadata=_help("MoA, semantic context, decoder and head"))
    backbone_learning_rate: float = field(default=1e-5, metadata=_help("unfrozen CLIP blocks (vision_model.*)"))
    weight_decay: float = field(default=0.01, metadata=_help("AdamW weight decay (not on biases/norms)"))
    max_grad_norm: float = field(default=1.0, metadata=_help("gradient clipping (0 disables)"))
    max_train_steps: int | None = field(default=None, metadata=_help(
        f"optimizer steps; overrides --num_train_epochs; default {DEFAULT_MAX_TRAIN_STEPS} when neither is given"))
    num_train_epochs: int | None = None
    gradient_accumulation_steps: int = 1
    lr_scheduler_type: Literal[LR_SCHEDULERS] = field(default="cosine", metadata=_help(
        "transformers get_scheduler name (after linear warm-up)"))
    num_warmup_steps: int | None = field(default=None, metadata=_help(
        "linear warm-up steps; default 5%% of the training steps"))
    mixed_precision: Literal["no", "bf16", "fp16"] | None = field(default=None, metadata=_help(
        "passed to Accelerator; default: accelerate launch's setting"))
    seed: int = 42
    on_nonfinite: Literal["error", "skip"] = field(default="error", metadata=_help(
        "a step with a non-finite loss or gradient: stop the run naming the step ('error'), or drop that update and "
        "go on ('skip'); non-finite weights are never saved either way"))
    # checkpoints, evaluation, logging
    output_dir: str = "outputs/train"
    overwrite_output_dir: bool = field(default=False, metadata=_help(
        "write into a non-empty --output_dir that is not from a previous run of this script, or replace the "
        "checkpoints, best/ and final/ of an earlier run there"))
    checkpointing_steps: int = field(default=100, metadata=_help(
        "accelerate.save_state every N steps into output_dir/checkpoints/step_N (0: never)"))
    checkpoints_total_limit: int = field(default=2, metadata=_help("keep only the last N checkpoints (0: keep all)"))
    resume_from_checkpoint: str | None = field(default=None, metadata=_help(
        "'latest' (the newest complete one in output_dir/checkpoints; incomplete ones are skipped with a warning) "
        "or a step_N folder"))
    stop_after_steps: int | None = field(default=None, metadata=_help(
        "end this run after this many steps (counted from the start of training), saving a checkpoint and skipping "
        "the final evaluation: for time-boxed jobs; the schedule still follows --max_train_steps"))
    eval_steps: int = field(default=50, metadata=_help(
        "evaluate on the eval split every N steps and after the last step (0: only after the last)"))
    metric_for_best_model: Literal["abs_rel", "rmse"] = "abs_rel"
    eval_crop: Literal[CROPS] = "eigen"
    flip_average: bool = field(default=False, metadata=_help("flip averaging in the final evaluation"))
    final_eval_model: Literal["best", "final"] = field(default="best", metadata=_help(
        "which weights the final evaluation scores"))
    report_to: Literal["tensorboard", "none"] = field(default="tensorboard", metadata=_help(
        "TensorBoard logging (skipped with a notice if tensorboard is not installed)"))
    num_visual_samples: int = field(default=4, metadata=_help("frames per samples.png"))

    def __post_init__(self):
        check_pairs(self, "input_size", "synthetic_size")
        check_values(
            self,
            positive_int=("max_train_samples", "max_eval_samples", "input_size", "synthetic_size",
                          "per_device_train_batch_size", "per_device_eval_batch_size", "max_train_steps",
                          "num_train_epochs", "gradient_accumulation_steps", "stop_after_steps"),
            non_negative_int=("dataloader_num_workers", "num_warmup_steps", "checkpointing_steps",
                              "checkpoints_total_limit", "eval_steps", "num_visual_samples"),
            positive_float=("learning_rate", "backbone_learning_rate"),
        )
        if self.max_train_steps is None and self.num_train_epochs is None:
            self.max_train_steps = DEFAULT_MAX_TRAIN_STEPS
        if self.stop_after_steps is not None and self.max_train_steps is not None:
            if self.stop_after_steps >= self.max_train_steps:
                raise ArgumentValueError("--stop_after_steps", "must be smaller than --max_train_steps")


def parse_args(argv: Sequence[str] | None = None) -> TrainArguments:
    return parse_settings(TrainArguments, argv, PROG, TrainArguments.__doc__)


def parse_test_datasets(values: Sequence[str] | None, dataset: str, nyu_default=NYU_SAMPLE_DIR) -> list[tuple[str, str]]:
    """`(source, split)` of every final evaluation; by default the training dataset's test split and the NYU frames
    (`$MOA_DEPTHCLIP_NYU_SAMPLE`, else `nyu_default`) when present and not the training dataset itself."""
    if values is not None and [v.lower() for v in values] in (["none"], []):
        return []
    if values is None:
        specs = [(dataset, "test")]
        nyu = nyu_sample_dir(nyu_default)
        if nyu is not None and not _same_path(dataset, nyu):
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


def model_config(args: TrainArguments) -> MoADepthCLIPConfig:
    """The config of the model to train (--model's, else --config_name's): the depth range of the data comes from it."""
    if args.model is not None:
        try:
            return load_config(args.model)
        except ModelLoadError as error:
            raise ArgumentValueError("--model", str(error)) from None
    try:
        return config_from_name(args.config_name, EXAMPLES_DIR / "configs")
    except ValueError as error:
        raise ArgumentValueError("--config_name", str(error)) from None


def load_or_build_model(args: TrainArguments, config: MoADepthCLIPConfig):
    """(model, image_processor, description) from --model, or from `config` (+ a local CLIP if available)."""
    if args.model is not None:
        try:
            model, image_processor = load_model_and_processor(args.model)
        except ModelLoadError as error:
            raise ArgumentValueError("--model", str(error)) from None
        model.apply_trainable_mask()
        return model, image_processor, f"checkpoint {args.model}"
    model = MoADepthCLIPForDepthEstimation(config)
    image_processor = default_image_processor(config)
    loaded = initialise_from_clip(args, model)
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


def initialise_from_clip(args: TrainArguments, model) -> str | None:
    """What `init_from_clip` loaded from --clip_model, or None when it is not available (an error if asked for)."""
    explicit = args.clip_model != DEFAULT_CLIP
    try:
        return init_from_clip(model, args.clip_model, local_files_only=True).describe()
    except OSError as error:  # not in the local cache or not a CLIP checkpoint: a warning, unless asked for
        if explicit and os.path.exists(os.path.expanduser(args.clip_model)):
            raise ArgumentValueError("--clip_model", f"cannot read a CLIP checkpoint from {args.clip_model} "
                                     f"({error})") from None
    except ValueError as error:  # found, but it does not fit the config or has no tokenizer
        if explicit:
            raise ArgumentValueError("--clip_model", f"{args.clip_model}: {error}") from None
    return None


def set_input_size(args: TrainArguments, model, image_processor) -> tuple[int, int]:
    """The model's input size (--input_size, else the image processor's), stored in the processor that is saved."""
    patch = model.config.vision_config.patch_size
    if args.input_size is not None:
        input_size = tuple(args.input_size)
    else:
        input_size = (int(image_processor.size["height"]), int(image_processor.size["width"]))
    if input_size[0] % patch or input_size[1] % patch:
        raise ArgumentValueError("--input_size", f"{input_size[0]} {input_size[1]}: both sides must be multiples of "
                                 f"the patch size {patch}")
    image_processor.size = {"height": int(input_size[0]), "width": int(input_size[1])}
    image_processor.size_divisor = patch
    return input_size


def enable_gradient_checkpointing(model):
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    logger.info("gradient checkpointing on: CLIP blocks are recomputed in the backward pass")


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


def load_data(args: TrainArguments, config: MoADepthCLIPConfig) -> SimpleNamespace:
    """Training set, periodic evaluation set and the final test datasets, depth in the model's range."""
    load_kwargs = dict(synthetic_size=tuple(args.synthetic_size), seed=args.seed, min_depth=config.min_depth,
                       max_depth=config.max_depth)
    try:
        train = load_dataset_or_error(args.dataset, args.train_split, num_samples=args.max_train_samples, **load_kwargs)
    except ValueError as error:
        raise ArgumentValueError("--dataset", str(error)) from None
    if not hasattr(train, "__len__"):
        raise ArgumentValueError("--dataset", f"{args.dataset}: training needs a map-style dataset (not streaming)")
    eval_set, eval_split = load_eval_data(args, load_kwargs)
    test_specs = parse_test_datasets(args.test_datasets, args.dataset)
    for source, _ in test_specs:  # checked now, loaded after training
        try:
            missing = classify_source(source) is SourceKind.MISSING
        except ValueError as error:
            raise ArgumentValueError("--test_datasets", str(error)) from None
        if missing:
            raise ArgumentValueError("--test_datasets", f"dataset folder or file not found: {source}")
    return SimpleNamespace(train=train, eval=eval_set, eval_split=eval_split, test_specs=test_specs)


def load_eval_data(args: TrainArguments, load_kwargs: dict):
    """(periodic evaluation set, its split): the first of the candidate splits that loads; (None, None) if none."""
    for split in resolve_eval_split(args.dataset, args.eval_split):
        try:
            eval_set = load_dataset_or_error(args.dataset, split, num_samples=args.max_eval_samples, **load_kwargs)
        except ValueError as error:
            if args.eval_split is not None:
                raise ArgumentValueError("--eval_split", str(error)) from None
            continue
        if args.dataset == "synthetic":
            # rendered scenes are cached (rendering is the slow part); file datasets are read at each evaluation
            eval_set = [eval_set[i] for i in range(len(eval_set))]
        return eval_set, split
    return None, None


def require_valid_depth(args: TrainArguments, train_set, model):
    """Without a single valid depth pixel every loss term is 0: nothing would be learnt, yet a model would be saved."""
    if first_example_with_valid_depth(train_set, model.depth_loss.valid_mask) is None:
        raise ArgumentValueError(
            "--dataset",
            f"{args.dataset}: none of the {len(train_set)} training examples has a valid depth pixel (finite, in "
            f"({model.config.min_depth:g}, {model.config.max_depth:g}] m, the model's depth range)",
        )


def train_dataloader_for(args: TrainArguments, train_set, image_processor, input_size) -> DataLoader:
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


# ------------------------------------------------------------------------------------------------
# Output folder, resumption, launch
# ------------------------------------------------------------------------------------------------


def check_run_folder(args: TrainArguments) -> Path:
    """--output_dir may take this run: a folder (or nothing yet), not held by a live run, empty or this script's."""
    try:  # a file in the way, or a folder that cannot be written (nothing is created yet)
        output_dir = check_output_dir(args.output_dir, create=False)
    except OSError as error:
        raise ArgumentValueError("--output_dir", str(error)) from None
    holder = lock_holder(output_dir)
    if holder is not None:  # checked first: a live run's checkpoints are not "an earlier run"
        raise ArgumentValueError(
            "--output_dir",
            f"{output_dir} is in use by another training run (pid {holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it "
            "to end or choose another folder",
        )
    if output_dir.is_dir() and any(output_dir.iterdir()) and not args.overwrite_output_dir:
        if not _written_by_this_script(output_dir / RUN_MARKER):
            raise ArgumentValueError(
                "--output_dir",
                f"{output_dir} is not empty and not from a previous run of this script; choose another folder or pass "
                "--overwrite_output_dir",
            )
    return output_dir


def _written_by_this_script(marker: Path) -> bool:
    try:
        return marker.is_file() and json.loads(marker.read_text()).get("script") == SCRIPT_ID
    except (OSError, json.JSONDecodeError, AttributeError):
        return False


def resolve_resume(args: TrainArguments, output_dir: Path) -> Path | None:
    """The checkpoint to resume from; refuses to replace an earlier run's results unless --overwrite_output_dir."""
    try:
        resume_path = resolve_resume_checkpoint(output_dir, args.resume_from_checkpoint)
    except CheckpointError as error:
        raise ArgumentValueError("--resume_from_checkpoint", str(error)) from None
    replaced = earlier_outputs(output_dir, resume_path)
    if replaced and not args.overwrite_output_dir:
        shown = ", ".join(os.path.relpath(p, output_dir) for p in replaced)
        if resume_path is None:
            raise ArgumentValueError(
                "--output_dir",
                f"{output_dir} holds an earlier run ({shown}): continue it with --resume_from_checkpoint latest, or pass "
                "--overwrite_output_dir to replace it",
            )
        raise ArgumentValueError(
            "--resume_from_checkpoint",
            f"{resume_path}: {output_dir} holds newer checkpoints ({shown}) that this run would replace; pass --overwrite_output_dir "
            "to drop them, or resume into another --output_dir",
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


def setup_accelerator(args: TrainArguments, output_dir: Path) -> Accelerator:
    """The Accelerator (TensorBoard when installed) and the logging of every process; says so when the launcher
    started fewer processes than it was asked for."""
    log_with = None
    if args.report_to == "tensorboard" and any(importlib.util.find_spec(name) is not None
                                               for name in ("tensorboard", "tensorboardX")):
        log_with = "tensorboard"
    try:
        accelerator = Accelerator(
            mixed_precision=args.mixed_precision,
            gradient_accumulation_steps=args.gradient_accumulation_steps,
            log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / "logs")),
        )
    except (ValueError, RuntimeError) as error:
        raise ArgumentValueError("accelerate", f"cannot set it up: {first_line(error)}") from None
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
        force=True,
    )
    if accelerator.is_main_process:
        transformers.utils.logging.set_verbosity_warning()
    else:
        transformers.utils.logging.set_verbosity_error()
    if args.report_to == "tensorboard" and log_with is None:
        logger.info("tensorboard is not installed: no TensorBoard logs (pip install tensorboard)")
    shortfall = launch_shortfall(accelerator.num_processes, requested_num_processes())
    if shortfall is not None:
        logger.warning(shortfall)
    return accelerator


def take_output_dir(args: TrainArguments, accelerator, output_dir: Path, resume_path: Path | None, cleanup):
    """One run at a time in the folder (a lock), marked as ours; SIGINT/SIGTERM from here on end the run with a
    checkpoint. Returns the interrupt handler."""
    try:
        lock = start_run(accelerator, output_dir, resume_path, args.overwrite_output_dir)
    except OutputDirInUseError as error:
        raise ArgumentValueError("--output_dir", str(error)) from None
    if lock is not None:
        cleanup.callback(lock.release)
    interrupt = cleanup.enter_context(GracefulInterrupt())
    if accelerator.is_main_process:
        marker = {"script": SCRIPT_ID, **asdict(args)}
        (output_dir / RUN_MARKER).write_text(json.dumps(marker, indent=2, default=str) + "\n")
    accelerator.wait_for_everyone()
    return interrupt


# ------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------


@dataclass
class TrainingRun:
    """Everything a run's steps share once it is set up."""

    args: TrainArguments
    accelerator: Accelerator
    model: torch.nn.Module
    image_processor: object
    description: str
    input_size: tuple[int, int]
    data: SimpleNamespace
    output_dir: Path
    interrupt: GracefulInterrupt
    optimizer: torch.optim.Optimizer = None
    lr_scheduler: object = None
    dataloader: DataLoader = None
    steps_per_epoch: int = 0
    num_warmup_steps: int = 0
    progress: TrainingProgress = field(default_factory=TrainingProgress)


def prepare_optimisation(run: TrainingRun):
    """AdamW with the paper's parameter groups, the dataloader and the schedule, prepared by accelerate."""
    args, accelerator = run.args, run.accelerator
    dataloader = train_dataloader_for(args, run.data.train, run.image_processor, run.input_size)
    optimizer = torch.optim.AdamW(
        parameter_groups(run.model, args.learning_rate, args.backbone_learning_rate, args.weight_decay),
        lr=args.learning_rate,
    )
    run.model, run.optimizer, run.dataloader = accelerator.prepare(run.model, optimizer, dataloader)
    run.steps_per_epoch, run.num_warmup_steps = plan_steps(args, len(run.dataloader))
    run.lr_scheduler = accelerator.prepare(create_lr_scheduler(
        args.lr_scheduler_type, run.optimizer, run.num_warmup_steps, args.max_train_steps, accelerator.num_processes
    ))


def plan_steps(args: TrainArguments, batches_per_epoch: int) -> tuple[int, int]:
    """(optimizer steps per epoch, warm-up steps); fills in --max_train_steps from --num_train_epochs."""
    steps_per_epoch = math.ceil(batches_per_epoch / args.gradient_accumulation_steps)
    if args.max_train_steps is None:
        args.max_train_steps = args.num_train_epochs * steps_per_epoch
    if args.stop_after_steps is not None and args.stop_after_steps >= args.max_train_steps:
        raise ArgumentValueError("--stop_after_steps", "must be smaller than the number of training steps")
    num_warmup_steps = args.num_warmup_steps if args.num_warmup_steps is not None else default_warmup_steps(args.max_train_steps)
    return steps_per_epoch, num_warmup_steps


def resume_state(run: TrainingRun, resume_path: Path | None):
    """Model, optimizer, scheduler, RNG and progress of the checkpoint; says so when it was saved with another
    number of processes, batch or accumulation. The setup of this run is what its checkpoints record."""
    args, accelerator = run.args, run.accelerator
    setup = launch_setup(accelerator.num_processes, args.per_device_train_batch_size, args.gradient_accumulation_steps)
    if resume_path is not None:
        accelerator.load_state(str(resume_path))
        run.progress.load(resume_path)
        logger.info(f"resumed from {resume_path} at step {run.progress.global_step}")
        mismatch = resume_mismatch(run.progress.launch, setup, resume_path)
        if mismatch is not None:
            logger.warning(mismatch)
    run.progress.launch = setup


def start_trackers(run: TrainingRun):
    if run.accelerator.log_with:
        hparams = {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in asdict(run.args).items()}
        run.accelerator.init_trackers("moa_depthclip", config=hparams)


def log_setup(run: TrainingRun):
    args, model, data = run.args, run.accelerator.unwrap_model(run.model), run.data
    num_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    num_total = sum(p.numel() for p in model.parameters())
    logger.info(
        f"model: {run.description}; {num_trainable:,} trainable of {num_total:,} parameters; input "
        f"{run.input_size[0]}x{run.input_size[1]}; depth range [{model.config.min_depth:g}, {model.config.max_depth:g}] m"
    )
    logger.info(
        f"data: {args.dataset} ({args.train_split}: {len(data.train)} examples; eval: "
        f"{f'{data.eval_split}, {len(data.eval)} examples' if data.eval is not None else 'none'}); "
        f"{args.max_train_steps} steps of batch {args.per_device_train_batch_size} x {run.accelerator.num_processes} "
        f"process(es) x {args.gradient_accumulation_steps} accumulation; {run.steps_per_epoch} steps per epoch; "
        f"lr {args.learning_rate:g} (head) / {args.backbone_learning_rate:g} (CLIP blocks), warm-up "
        f"{run.num_warmup_steps}, {args.lr_scheduler_type}; mixed precision {run.accelerator.mixed_precision}"
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


def periodic_evaluation(run: TrainingRun, step: int):
    """Evaluate on the eval split and keep the best model in best/; an evaluation that fails costs only itself."""
    args, accelerator, data, progress = run.args, run.accelerator, run.data, run.progress
    if data.eval is None:
        return None
    settings = EvaluationSettings(batch_size=args.per_device_eval_batch_size, crop=args.eval_crop,
                                  input_size=run.input_size, num_visual_samples=0, show_progress=False,
                                  dataset_name=f"{args.dataset} ({data.eval_split})")
    try:
        result = evaluate(accelerator.unwrap_model(run.model), run.image_processor, data.eval, settings,
                          accelerator=accelerator)
    except (OSError, ValueError) as error:
        logger.warning(f"step {step}: evaluation on {data.eval_split} failed, training goes on without it: {error}")
        return None
    metrics, metric = result["metrics"], args.metric_for_best_model
    progress.eval_history.append({"step": step, **metrics})
    accelerator.log({f"eval/{k}": v for k, v in metrics.items()}, step=step)
    improved = math.isfinite(metrics[metric]) and (progress.best_metric is None or metrics[metric] < progress.best_metric)
    logger.info(
        f"step {step}: eval {data.eval_split} abs_rel {metrics['abs_rel']:.4f} rmse {metrics['rmse']:.4f} "
        f"d1 {metrics['d1']:.4f}" + (" (best so far: saved to best/)" if improved else "")
    )
    if improved:
        progress.best_metric, progress.best_step = float(metrics[metric]), step
        save_model_folder(accelerator, run.model, run.image_processor, run.output_dir / "best", {
            "step": step, "eval_split": data.eval_split, "metric_for_best_model": metric, "eval_metrics": metrics
        })
    return metrics


class TrainingLoop:
    """From `progress.global_step` to --max_train_steps (or --stop_after_steps, or a signal): one optimizer step at a
    time (`micro_step` per batch, `finish_step` once the gradients are synchronised), logging every step, evaluating
    every --eval_steps and after the last, checkpointing every --checkpointing_steps."""

    def __init__(self, run: TrainingRun, cleanup: contextlib.ExitStack):
        self.run, args, accelerator = run, run.args, run.accelerator
        self.moa_layers = [int(i) for i in getattr(accelerator.unwrap_model(run.model), "moa", {})]  # router blocks
        self.lr_names = [group["name"] for group in run.optimizer.param_groups]
        self.trainable = [p for p in run.model.parameters() if p.requires_grad]
        self.stop_at = min(args.stop_after_steps or args.max_train_steps, args.max_train_steps)
        # fp16 gradient scaling skips overflowing steps itself: only its losses are checked
        self.guard = NonFiniteGuard(accelerator, args.on_nonfinite, check_gradients=accelerator.mixed_precision != "fp16")
        self.window = {"loss": [], "components": [], "router": []}
        self.update, self.loss_names = True, []
        self.signum = self.checkpoint = None
        self.eval_seconds = 0.0
        self.progress_bar = tqdm(total=args.max_train_steps, initial=run.progress.global_step, desc="train",
                                 unit="step", disable=not accelerator.is_local_main_process)
        cleanup.callback(self.progress_bar.close)

    def train(self) -> dict:
        """Returns the seconds spent, and the signal and checkpoint that ended it early, if any."""
        run = self.run
        run.model.train()
        start = time.perf_counter()
        epoch = run.progress.global_step // run.steps_per_epoch
        skip = (run.progress.global_step % run.steps_per_epoch) * run.args.gradient_accumulation_steps
        while run.progress.global_step < self.stop_at and self.signum is None:
            for batch in self.batches(epoch, skip):
                if self.micro_step(batch) and self.finish_step(epoch):
                    break
            skip, epoch = 0, epoch + 1
        self.progress_bar.close()
        run.interrupt.restore()  # from here on (final save and evaluation) Ctrl-C acts at once
        return {"train_seconds": time.perf_counter() - start, "periodic_eval_seconds": self.eval_seconds,
                "signum": self.signum, "checkpoint": self.checkpoint}

    def batches(self, epoch: int, skip: int):
        """The epoch's batches; a resumed run skips those its checkpoint's step already consumed."""
        dataloader = self.run.dataloader
        dataloader.set_epoch(epoch)
        return self.run.accelerator.skip_first_batches(dataloader, skip) if skip else dataloader

    def micro_step(self, batch) -> bool:
        """Forward and backward of one batch, the update once gradients are accumulated; True then."""
        run, accelerator = self.run, self.run.accelerator
        with accelerator.accumulate(run.model):
            outputs = run.model(pixel_values=batch["pixel_values"], labels=batch["labels"])
            accelerator.backward(outputs.loss)
            self.window["loss"].append(outputs.loss.detach().float())
            self.update = not accelerator.sync_gradients or self.gradients_are_finite()
            if self.update:
                run.optimizer.step()
            run.lr_scheduler.step()
            run.optimizer.zero_grad(set_to_none=True)
        components = outputs.loss_components
        self.loss_names = sorted(components)
        self.window["components"].append(torch.stack([components[k].float() for k in self.loss_names]))
        if outputs.router_probs is not None:
            self.window["router"].append(outputs.router_probs.detach().float().mean(dim=0))
        return accelerator.sync_gradients

    def gradients_are_finite(self) -> bool:
        """Clip (or measure) the gradients; one verdict for all processes (raises with --on_nonfinite error)."""
        max_grad_norm = self.run.args.max_grad_norm
        if max_grad_norm > 0:
            grad_norm = self.run.accelerator.clip_grad_norm_(self.trainable, max_grad_norm)
        else:
            grad_norm = gradient_norm(self.trainable)
        return self.guard.step_is_finite(self.run.progress.global_step + 1, self.window["loss"], grad_norm)

    def finish_step(self, epoch: int) -> bool:
        """Count, check, log, evaluate and checkpoint the optimizer step just taken; True when the run stops here."""
        run, args = self.run, self.run.args
        run.progress.global_step += 1
        step = run.progress.global_step
        if not self.update:
            run.progress.skipped_steps.append(step)
        else:
            self.require_finite_weights(step)
        self.signum = run.interrupt.agreed(run.accelerator)
        self.log_step(step, epoch)
        last = step >= args.max_train_steps
        if (args.eval_steps and step % args.eval_steps == 0) or last:
            eval_start = time.perf_counter()
            periodic_evaluation(run, step)
            self.eval_seconds += time.perf_counter() - eval_start
        stopping = (step >= self.stop_at or self.signum is not None) and not last
        if (args.checkpointing_steps and step % args.checkpointing_steps == 0) or stopping:
            self.checkpoint = save_checkpoint(run.accelerator, run.output_dir, step, run.progress,
                                              args.checkpoints_total_limit)
            logger.info(f"step {step}: saved state to {self.checkpoint}")
        return step >= self.stop_at or self.signum is not None

    def require_finite_weights(self, step: int):
        bad = [p for p in self.trainable if not torch.isfinite(p.detach()).all()]
        if bad:
            names = {id(p): n for n, p in self.run.model.named_parameters()}
            raise NonFiniteTrainingError(
                f"training diverged at step {step}: the update made {len(bad)} parameter(s) non-finite "
                f"(first: {names[id(bad[0])]}); nothing of step {step} was saved (lower --learning_rate)"
            )

    def log_step(self, step: int, epoch: int):
        """The step's loss, loss parts and router usage averaged over its batches and processes."""
        run, window = self.run, self.window
        stats = torch.cat([
            torch.stack(window["loss"]).mean().reshape(1),
            torch.stack(window["components"]).mean(dim=0),
            torch.stack(window["router"]).mean(dim=0).flatten() if window["router"] else window["loss"][0].new_zeros(0),
        ])
        stats = run.accelerator.reduce(stats, reduction="mean").cpu()
        self.window = {"loss": [], "components": [], "router": []}
        step_loss = float(stats[0])
        run.progress.loss_history.append([step, step_loss])
        run.accelerator.log(step_log(stats, self.loss_names, self.moa_layers, self.lr_names,
                                     run.lr_scheduler.get_last_lr()), step=step)
        self.progress_bar.update(1)
        self.progress_bar.set_postfix(loss=f"{step_loss:.4f}", epoch=epoch)


def exit_for_signal(accelerator, signum: int, message: str):
    if accelerator.is_main_process:
        print(f"\nStopped by {signal.Signals(signum).name} {message}", file=sys.stderr)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    raise SystemExit(128 + signum)


def final_evaluation(run: TrainingRun) -> SimpleNamespace:
    """Evaluate best/ (or final/) on every test dataset; eval/<dataset>/ gets its outputs. A dataset that cannot be
    loaded or scored is skipped with a warning: the trained model is saved already."""
    args, accelerator, progress = run.args, run.accelerator, run.progress
    best = run.output_dir / "best"
    eval_dir = best if args.final_eval_model == "best" and best.is_dir() else run.output_dir / "final"
    eval_model = accelerator.unwrap_model(run.model)
    if eval_dir == best and progress.best_step != progress.global_step:
        eval_model, _ = load_model_and_processor(str(eval_dir), device=accelerator.device)
    settings = EvaluationSettings(batch_size=args.per_device_eval_batch_size, crop=args.eval_crop,
                                  flip_average=args.flip_average, input_size=run.input_size,
                                  num_visual_samples=args.num_visual_samples, model_name=str(eval_dir))
    results, written, timings = {}, {}, {}
    for source, split in run.data.test_specs:
        label = dataset_label(source, split)
        start = time.perf_counter()
        try:
            size = (480, 640) if source == "synthetic" else tuple(args.synthetic_size)
            dataset = load_dataset_or_error(source, split, synthetic_size=size, seed=args.seed,
                                            min_depth=eval_model.config.min_depth, max_depth=eval_model.config.max_depth)
            result = evaluate(eval_model, run.image_processor, dataset, settings, accelerator=accelerator,
                              dataset_name=f"{source} ({split})")
        except (OSError, ValueError) as error:
            logger.warning(f"final evaluation skipped for {source}: {error}")
            continue
        results[label] = result
        timings[label] = time.perf_counter() - start
        if accelerator.is_main_process:
            written[label] = write_evaluation_outputs(result, run.output_dir / "eval" / label,
                                                      f"{eval_dir.name} model on {label}")
    return SimpleNamespace(model_dir=eval_dir, config=eval_model.config, results=results, written=written,
                           timings=timings)


def write_report(run: TrainingRun, final: SimpleNamespace, summary: dict):
    """timings.json, the metrics.json/md of every test dataset, and the closing lines on stdout (main process)."""
    args, output_dir, progress = run.args, run.output_dir, run.progress
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
    table = write_final_metrics(run, final) if results else None
    print()
    print(f"Trained {global_step} steps in {train_seconds - eval_seconds:.0f} s (+ {eval_seconds:.0f} s periodic "
          f"evaluation); model: {run.description}")
    if results:
        print(f"Final evaluation of {final.model_dir} (metrics averaged per image; {args.eval_crop} crop):")
        print(table)
        for label, paths in final.written.items():
            skipped = len(results[label]["skipped"])
            print(f"  {label} ({results[label]['num_images']} images{f', {skipped} skipped' if skipped else ''}, "
                  f"{final.timings[label]:.0f} s): {paths['metrics_json'].parent}/ [metrics.json, metrics.md, "
                  f"per_image_metrics.csv{', samples.png' if 'samples_png' in paths else ''}]")
    if progress.best_step is not None:
        print(f"Best model: {output_dir / 'best'} (step {progress.best_step}, eval {run.data.eval_split} "
              f"{args.metric_for_best_model} {progress.best_metric:.4f})")
    print(f"Final model: {output_dir / 'final'}")
    if summary.get("loss_curve") is not None:
        print(f"Loss curve: {summary['loss_curve']}")
    if results:
        print(f"Summary: {output_dir / 'metrics.md'}, {output_dir / 'metrics.json'}")
    if (output_dir / "logs").is_dir():
        print(f"TensorBoard logs: {output_dir / 'logs'}  (tensorboard --logdir {output_dir / 'logs'})")
    print(f"Total time: {summary['total_seconds']:.0f} s")


def write_final_metrics(run: TrainingRun, final: SimpleNamespace) -> str:
    """metrics.json and metrics.md: one row per test dataset; returns the table."""
    progress, results = run.progress, final.results
    table = format_metrics_markdown({label: r["metrics"] for label, r in results.items()}, label="dataset")
    (run.output_dir / "metrics.json").write_text(json.dumps({
        "model": str(final.model_dir),
        "step": progress.best_step if final.model_dir.name == "best" else progress.global_step,
        "results": {label: {**r["metrics"], "num_images": r["num_images"], "skipped_frames": r["skipped"],
                            "protocol": r["protocol"]} for label, r in results.items()},
    }, indent=2) + "\n")
    (run.output_dir / "metrics.md").write_text(
        f"# MoA-DepthCLIP: {final.model_dir.name} model ({run.description}, {progress.global_step} steps)\n\n"
        f"{table}\n\nCrop {run.args.eval_crop}, prediction clamped to [{final.config.min_depth:g}, "
        f"{final.config.max_depth:g}] m, {AVERAGING}.\n"
    )
    return table


# ------------------------------------------------------------------------------------------------
# Main
# ------------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> dict:
    """Train; exits 1 on divergence, 128 + signal number after SIGINT/SIGTERM (with a checkpoint), 2 on bad input."""
    args = parse_args(argv)
    try:
        with contextlib.ExitStack() as cleanup:  # lock, signal handlers, progress bar: released before the message
            return train(args, argv, cleanup)
    except ArgumentValueError as error:
        exit_with_error(PROG, error)
    except NonFiniteTrainingError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        raise SystemExit(1) from None


def set_up(args: TrainArguments, cleanup: contextlib.ExitStack) -> TrainingRun:
    """Every check first (bad inputs fail here, before anything is written), then the model, data and state."""
    output_dir = check_run_folder(args)
    resume_path = resolve_resume(args, output_dir)
    # the model's config (its depth range) and the data first: bad inputs fail here, before anything is built
    config = model_config(args)
    data = load_data(args, config)
    if args.decoded_cache_dir is not None:
        try:
            data.train = DecodedFrames(data.train, args.decoded_cache_dir)
        except (OSError, ValueError) as error:
            raise ArgumentValueError("--decoded_cache_dir", str(error)) from None
    accelerator = setup_accelerator(args, output_dir)
    set_seed(args.seed)
    model, image_processor, description = load_or_build_model(args, config)
    input_size = set_input_size(args, model, image_processor)
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    require_valid_depth(args, data.train, model)
    interrupt = take_output_dir(args, accelerator, output_dir, resume_path, cleanup)
    run = TrainingRun(args=args, accelerator=accelerator, model=model, image_processor=image_processor,
                      description=description, input_size=input_size, data=data, output_dir=output_dir,
                      interrupt=interrupt)
    prepare_optimisation(run)
    start_trackers(run)
    resume_state(run, resume_path)
    log_setup(run)
    return run


def train(args: TrainArguments, argv: Sequence[str] | None, cleanup: contextlib.ExitStack) -> dict:
    total_start = time.perf_counter()
    run = set_up(args, cleanup)
    accelerator, progress, output_dir = run.accelerator, run.progress, run.output_dir
    summary = TrainingLoop(run, cleanup).train()
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
        logger.info(f"stopped after step {progress.global_step} of {args.max_train_steps} (--stop_after_steps); "
                    f"continue with --resume_from_checkpoint latest --output_dir {output_dir}")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return summary
    return finish(run, summary, signum, total_start)


def finish(run: TrainingRun, summary: dict, signum: int | None, total_start: float) -> dict:
    """final/, the final evaluation and the report."""
    accelerator, output_dir = run.accelerator, run.output_dir
    info = {"step": run.progress.global_step, "model": run.description,
            "args": {k: str(v) for k, v in asdict(run.args).items()}}
    save_model_folder(accelerator, run.model, run.image_processor, output_dir / "final", info)
    if signum is not None:  # the signal came during the last step: the model is complete, its evaluation is not run
        exit_for_signal(accelerator, signum, f"after the last step; final model: {output_dir / 'final'} "
                        "(final evaluation skipped)")
    summary["final_model"] = str(output_dir / "final")
    final_start = time.perf_counter()
    final = final_evaluation(run)
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
        write_report(run, final, summary)
    return summary


if __name__ == "__main__":
    main()
