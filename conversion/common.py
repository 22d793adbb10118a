"""What the converters share: their errors, output folders written atomically and checked by reloading, the
MoA options of their command lines, and small formatting helpers."""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

import torch
from transformers import AutoModelForDepthEstimation, CLIPVisionConfig

from modeling_moa_depthclip import DepthCLIPForDepthEstimation, MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation
from modeling_moa_depthclip.clip.initialization import config_from_clip
from modeling_moa_depthclip.configuration_moa_depthclip import BIN_SPACINGS, DECODERS

__all__ = [
    "ConversionError",
    "MOA_OPTIONS",
    "SOURCE_FORMATS",
    "add_moa_arguments",
    "build_config",
    "display_name",
    "install_output",
    "moa_config_kwargs",
    "moa_options_from_args",
    "one_line",
    "parameter_counts",
    "prepare_output_dir",
    "read_prompts_file",
    "self_check",
    "write_checkpoint",
]


class ConversionError(ValueError):
    """A conversion that cannot go ahead, with the reason in one line."""


# MoADepthCLIPConfig fields the command line sets; None means "the config's default".
MOA_OPTIONS = (
    "moa_layers",
    "num_experts",
    "adapter_bottleneck",
    "num_unfrozen_layers",
    "num_depth_bins",
    "bin_spacing",
    "decoder",
    "min_depth",
    "max_depth",
    "depth_prompts",
)

SOURCE_FORMATS = {
    "folder": "transformers CLIPModel folder",
    "hub": "transformers CLIPModel from the Hub",
    "torchscript": "TorchScript archive",
    "pickle": "PyTorch state dict",
    "safetensors": "safetensors state dict",
}


def build_config(vision_config: CLIPVisionConfig, projection_dim: int, **moa_options) -> MoADepthCLIPConfig:
    """`MoADepthCLIPConfig` on the source's vision tower; options left at None keep the config's defaults."""
    return config_from_clip(vision_config, projection_dim, **moa_config_kwargs(moa_options))


def moa_config_kwargs(moa_options: dict) -> dict:
    """The :data:`MOA_OPTIONS` that are set (not None); `TypeError` for any other name."""
    unknown = sorted(set(moa_options) - set(MOA_OPTIONS))
    if unknown:
        raise TypeError(f"unknown MoA options {unknown}; known: {list(MOA_OPTIONS)}")
    return {key: value for key, value in moa_options.items() if value is not None}


def read_prompts_file(path: str | Path) -> list[str]:
    """One prompt per line; blank lines and lines starting with `#` are skipped."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except OSError as error:
        raise ConversionError(f"cannot read the prompts file {path}: {error.strerror or error}") from None
    prompts = [line.strip() for line in lines if line.strip() and not line.lstrip().startswith("#")]
    if not prompts:
        raise ConversionError(f"the prompts file {path} holds no prompt")
    return prompts


def prepare_output_dir(output_dir: str | Path, overwrite: bool) -> Path:
    """Check that `output_dir` may be written; returns it. The folder itself is replaced only after the checks."""
    output = Path(output_dir).expanduser().absolute()
    if output.exists() and not output.is_dir():
        raise ConversionError(f"output {output} exists and is not a folder")
    if output.is_dir() and any(output.iterdir()):
        if not overwrite:
            raise ConversionError(f"output folder {output} is not empty; pass --overwrite to replace its contents")
        if not (output / "config.json").is_file():
            raise ConversionError(
                f"refusing to replace {output}: it is not empty and does not look like a model folder "
                "(no config.json); choose another --output_dir"
            )
    return output


def install_output(staging: Path, output: Path) -> None:
    """Move the checked staging folder to `output`, replacing a previous checkpoint there."""
    if output.exists():
        shutil.rmtree(output)
    staging.rename(output)


def one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def display_name(source: str, source_format: str | None = None) -> str:
    """A Hub id as it is, a local path by its last component (cards must not leak local paths)."""
    if source_format == "hub" or (source_format is None and not Path(source).expanduser().exists()):
        return source
    return Path(source).name


def parameter_counts(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total:,} total, {trainable:,} trainable"


def self_check(
    folder: Path, written: MoADepthCLIPForDepthEstimation | DepthCLIPForDepthEstimation, vision_sd, prompt_embeddings, extra_check=None
) -> list[str]:
    """Reload `folder` and compare it with what was meant to be written; raise `ConversionError` on a difference.

    `extra_check(reloaded_model) -> list[str]` adds checks of its own on the reloaded model.
    """
    reloaded = AutoModelForDepthEstimation.from_pretrained(str(folder))
    if type(reloaded) is not type(written):
        raise ConversionError(
            f"{folder} reloads as {type(reloaded).__name__}, not {type(written).__name__}"
        )
    if not torch.equal(reloaded.semantic_context.prompt_embeddings, prompt_embeddings):
        raise ConversionError(
            f"self-check failed: prompt_embeddings reloaded from {folder} differ from the computed ones"
        )
    reloaded_vision = reloaded.vision_model.state_dict()
    if sorted(reloaded_vision) != sorted(vision_sd):
        raise ConversionError(f"self-check failed: the reloaded vision tower of {folder} has different tensors")
    differing = [k for k, v in vision_sd.items() if not torch.equal(reloaded_vision[k], v.to(reloaded_vision[k].dtype))]
    if differing:
        raise ConversionError(f"self-check failed: reloaded vision weights differ from the source: {differing[:5]}")
    expected, got = written.state_dict(), reloaded.state_dict()
    differing = sorted(k for k in expected if k not in got or not torch.equal(expected[k], got[k]))
    if differing or set(got) - set(expected):
        raise ConversionError(f"self-check failed: reloaded tensors differ from the written model: {differing[:5]}")
    checks = [
        f"reloaded with AutoModelForDepthEstimation: prompt_embeddings and all {len(vision_sd)} vision tensors equal "
        f"the source's, all {len(expected)} tensors equal the written model's"
    ]
    return checks + (extra_check(reloaded.eval()) if extra_check is not None else [])


def write_checkpoint(output: Path, model, processor, files: dict[str, str], check) -> list[str]:
    """Save model, processor and `files` (name -> text) to a staging sibling of `output`, run `check(staging)`,
    then move the folder into place. Nothing is left behind on failure."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output folder's mode
    try:
        model.save_pretrained(staging)
        processor.save_pretrained(staging)
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        checks = check(staging)
        install_output(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return checks


def add_moa_arguments(parser: argparse.ArgumentParser, exclude: tuple[str, ...] = ()) -> None:
    """The `MoADepthCLIPConfig` options of :data:`MOA_OPTIONS` (minus `exclude`), plus `--depth_prompts_file`."""
    defaults = MoADepthCLIPConfig()
    moa = parser.add_argument_group("MoA configuration (defaults: MoADepthCLIPConfig's)")
    options = {
        "moa_layers": dict(type=int, nargs="+", help=f"default {defaults.moa_layers}"),
        "num_experts": dict(type=int, help=f"default {defaults.num_experts}"),
        "adapter_bottleneck": dict(type=int, help=f"default {defaults.adapter_bottleneck}"),
        "num_unfrozen_layers": dict(type=int, help=f"default {defaults.num_unfrozen_layers}"),
        "num_depth_bins": dict(type=int, help=f"default {defaults.num_depth_bins}"),
        "bin_spacing": dict(choices=BIN_SPACINGS, help=f"default {defaults.bin_spacing}"),
        "decoder": dict(choices=DECODERS, help=f"default {defaults.decoder}"),
        "min_depth": dict(type=float, help=f"metres, default {defaults.min_depth}"),
        "max_depth": dict(type=float, help=f"metres, default {defaults.max_depth}"),
    }
    for name, kwargs in options.items():
        if name not in exclude:
            moa.add_argument(f"--{name}", default=None, **kwargs)
    prompts = moa.add_mutually_exclusive_group()
    prompts.add_argument(
        "--depth_prompts", nargs="+", default=None, metavar="PROMPT",
        help="text prompts of the semantic context (default: the 7 DepthCLIP prompts 'This object is giant', ...)",
    )  # fmt: skip
    prompts.add_argument(
        "--depth_prompts_file", default=None, metavar="FILE",
        help="the prompts, one per line (blank lines and # comments skipped)",
    )  # fmt: skip


def moa_options_from_args(args: argparse.Namespace) -> dict:
    """The MoA options the command line set (absent ones stay None: the config's default)."""
    options = {name: getattr(args, name, None) for name in MOA_OPTIONS}
    if getattr(args, "depth_prompts_file", None):
        options["depth_prompts"] = read_prompts_file(args.depth_prompts_file)
    return options
