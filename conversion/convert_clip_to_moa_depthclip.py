"""Turn a CLIP checkpoint into a MoA-DepthCLIP checkpoint folder.

    python conversion/convert_clip_to_moa_depthclip.py --clip_model SOURCE --output_dir DIR [options]

SOURCE is any CLIP ViT checkpoint `conversion/clip_checkpoints.py` reads: a Hub id (`openai/clip-vit-base-patch32`)
or a folder written by `CLIPModel.save_pretrained` (with its tokenizer), an original OpenAI checkpoint (the
`ViT-B-32.pt` TorchScript archive or a plain state dict in OpenAI's key layout), or an open_clip state dict
(`.bin`, `.pt`, `.safetensors`).

What is written (a folder `AutoModelForDepthEstimation.from_pretrained` and `pipeline("depth-estimation")` load,
also with `trust_remote_code=True` where the package is not installed):

* the CLIP vision tower, copied exactly into `vision_model` (a stock `CLIPVisionModel`), and CLIP's visual
  projection into `semantic_context.image_projection`;
* `semantic_context.prompt_embeddings`: the L2-normalised CLIP text features of `config.depth_prompts`, computed
  with the same checkpoint's text tower and tokenizer (the text tower is not kept);
* the Mixture-of-Adapters, semantic-context fusion, decoder and head, freshly initialised from `--seed`
  (adapters start as the identity: their up-projections are zero);
* config.json (with `auto_map`), model.safetensors, preprocessor_config.json, the package's code files and a
  README.md model card rendered from MODEL_CARD.md ("no evaluation yet").

The folder is written to a temporary sibling first, reloaded and checked (prompt embeddings, vision weights and
every other tensor equal what was meant to be written), and only then moved into place.
"""

from __future__ import annotations

import argparse
import copy
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `conversion` and `modeling_moa_depthclip` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.nn.functional as F
from transformers import (
    AutoModelForDepthEstimation,
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPTokenizer,
    CLIPVisionConfig,
)
from transformers.utils import logging as transformers_logging

from conversion.clip_checkpoints import OPENAI_CLIP_TOKENIZER, load_clip_checkpoint, vision_state_dict
from conversion.model_card import ModelCardError, config_details, render_model_card
from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation, MoADepthCLIPImageProcessor

__all__ = [
    "ConversionError",
    "ConversionResult",
    "MOA_OPTIONS",
    "add_moa_arguments",
    "build_config",
    "compute_prompt_embeddings",
    "convert",
    "load_tokenizer",
    "main",
    "moa_options_from_args",
    "prepare_output_dir",
    "read_prompts_file",
    "self_check",
    "write_checkpoint",
]

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

_SOURCE_FORMATS = {
    "folder": "transformers CLIPModel folder",
    "hub": "transformers CLIPModel from the Hub",
    "torchscript": "TorchScript archive",
    "pickle": "PyTorch state dict",
    "safetensors": "safetensors state dict",
}


class ConversionError(ValueError):
    """A conversion that cannot go ahead, with the reason in one line."""


@dataclass
class ConversionResult:
    output_dir: Path
    source: str
    layout: str
    source_format: str
    tokenizer: str
    config: MoADepthCLIPConfig
    parameters: str
    checks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        vision = self.config.vision_config
        return "\n".join(
            [
                f"converted {self.source} ({_SOURCE_FORMATS[self.source_format]}, {self.layout} layout)",
                f"  output dir:        {self.output_dir}",
                f"  vision tower:      {vision.num_hidden_layers} blocks, width {vision.hidden_size}, "
                f"patch {vision.patch_size}, {vision.hidden_act}",
                f"  prompt embeddings: {len(self.config.depth_prompts)} x {self.config.prompt_embedding_dim} "
                f"(text tower of the source, tokenizer {self.tokenizer})",
                f"  MoA:               blocks {self.config.moa_layers}, {self.config.num_experts} experts, "
                f"bottleneck {self.config.adapter_bottleneck}; decoder {self.config.decoder}",
                f"  parameters:        {self.parameters}",
                *(f"  self-check:        {check}" for check in self.checks),
            ]
        )


# --------------------------------------------------------------------------------------------
# Pieces
# --------------------------------------------------------------------------------------------


def build_config(vision_config: CLIPVisionConfig, projection_dim: int, **moa_options) -> MoADepthCLIPConfig:
    """`MoADepthCLIPConfig` on the source's vision tower; options left at None keep the config's defaults."""
    unknown = sorted(set(moa_options) - set(MOA_OPTIONS))
    if unknown:
        raise TypeError(f"unknown MoA options {unknown}; known: {list(MOA_OPTIONS)}")
    vision = copy.deepcopy(vision_config)
    vision.projection_dim = projection_dim
    vision.dtype = None  # the model is written in float32 whatever dtype the source was stored in
    options = {key: value for key, value in moa_options.items() if value is not None}
    return MoADepthCLIPConfig(vision_config=vision, prompt_embedding_dim=projection_dim, **options)


def load_tokenizer(spec: str):
    """The CLIP tokenizer of a folder or Hub id (AutoTokenizer, or CLIPTokenizer for bare vocab/merges files)."""
    try:
        return AutoTokenizer.from_pretrained(spec)
    except (OSError, ValueError, KeyError, TypeError) as auto_error:
        try:
            return CLIPTokenizer.from_pretrained(spec)
        except (OSError, ValueError, KeyError, TypeError):
            raise ConversionError(
                f"cannot load the tokenizer {spec!r} ({_one_line(auto_error)}); OpenAI and open_clip checkpoints "
                "carry no tokenizer: pass --tokenizer with a folder or Hub id holding the CLIP tokenizer "
                "(tokenizer.json, or vocab.json + merges.txt)"
            ) from None


def compute_prompt_embeddings(
    clip_state_dict: dict[str, torch.Tensor], clip_config: CLIPConfig, tokenizer, prompts: list[str]
) -> torch.Tensor:
    """L2-normalised `CLIPModel.get_text_features` of `prompts`, [num_prompts, projection_dim], float32.

    Refuses a tokenizer that does not fit the text tower: ids beyond its vocabulary, prompts longer than its
    context, or an end-of-text token other than the one the text tower pools at.
    """
    text_config = clip_config.text_config
    encoded = tokenizer(list(prompts), padding=True, return_tensors="pt")
    input_ids, attention_mask = encoded["input_ids"], encoded["attention_mask"]
    lengths = attention_mask.sum(dim=1)
    too_long = [p for p, n in zip(prompts, lengths.tolist()) if n > text_config.max_position_embeddings]
    if too_long:
        raise ConversionError(
            f"depth prompts {too_long} are longer than the text tower's {text_config.max_position_embeddings} tokens"
        )
    if int(input_ids.max()) >= text_config.vocab_size:
        raise ConversionError(
            f"the tokenizer produces token id {int(input_ids.max())} but the text tower's vocabulary has "
            f"{text_config.vocab_size} entries: the tokenizer does not belong to this CLIP checkpoint"
        )
    eos = tokenizer.eos_token_id
    if eos is None or not (input_ids == eos).any(dim=1).all():
        raise ConversionError("the tokenizer does not end every prompt with an end-of-text token")
    tokenizer_eos_position = (input_ids == eos).int().argmax(dim=1)
    if text_config.eos_token_id == 2:  # legacy CLIP configs: the text tower pools at the largest id
        pooled_position = input_ids.argmax(dim=1)
    else:
        pooled_position = (input_ids == text_config.eos_token_id).int().argmax(dim=1)
    if not torch.equal(pooled_position, tokenizer_eos_position):
        raise ConversionError(
            f"the tokenizer's end-of-text token (id {eos}) is not where the text tower pools "
            f"(its eos_token_id is {text_config.eos_token_id}): the tokenizer does not belong to this CLIP checkpoint"
        )

    clip = CLIPModel(copy.deepcopy(clip_config)).eval()
    clip.load_state_dict(clip_state_dict, strict=True)
    clip.float()
    with torch.no_grad():
        features = clip.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    # transformers 5.x returns a BaseModelOutputWithPooling whose pooler_output is the projected feature
    features = features if isinstance(features, torch.Tensor) else features.pooler_output
    return F.normalize(features.float(), dim=-1)


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


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _display_name(source: str, source_format: str | None = None) -> str:
    """A Hub id as it is, a local path by its last component (cards must not leak local paths)."""
    if source_format == "hub" or (source_format is None and not Path(source).expanduser().exists()):
        return source
    return Path(source).name


def parameter_counts(model) -> str:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"{total:,} total, {trainable:,} trainable"


def checkpoint_status(source: str, layout: str, source_format: str, seed: int) -> str:
    return (
        f"**Converted, not trained.** This checkpoint was written by `conversion/convert_clip_to_moa_depthclip.py` "
        f"from the CLIP checkpoint `{_display_name(source, source_format)}` ({_SOURCE_FORMATS[source_format]}, "
        f"{layout} layout). Its vision tower and visual projection are that checkpoint's weights and its prompt "
        f"embeddings come from that checkpoint's text tower; the Mixture-of-Adapters, semantic-context fusion, "
        f"decoder and depth head are freshly initialised (seed {seed}) and untrained, so its depth predictions "
        f"mean nothing until it is fine-tuned (see *Training recipe*)."
    )


def self_check(
    folder: Path, written: MoADepthCLIPForDepthEstimation, vision_sd, prompt_embeddings, extra_check=None
) -> list[str]:
    """Reload `folder` and compare it with what was meant to be written; raise `ConversionError` on a difference.

    `extra_check(reloaded_model) -> list[str]` adds checks of its own on the reloaded model.
    """
    reloaded = AutoModelForDepthEstimation.from_pretrained(str(folder))
    if type(reloaded) is not MoADepthCLIPForDepthEstimation:
        raise ConversionError(f"{folder} reloads as {type(reloaded).__name__}, not MoADepthCLIPForDepthEstimation")
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


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert(
    clip_model: str,
    output_dir: str | Path,
    *,
    tokenizer: str | None = None,
    image_size: tuple[int, int] = (224, 224),
    trust_torchscript: bool = False,
    hidden_act: str | None = None,
    seed: int = 0,
    overwrite: bool = False,
    model_name: str | None = None,
    model_id: str | None = None,
    **moa_options,
) -> ConversionResult:
    """Convert the CLIP checkpoint `clip_model` into a MoA-DepthCLIP folder at `output_dir` (see the module doc).

    `moa_options` are the `MoADepthCLIPConfig` fields of :data:`MOA_OPTIONS`; None keeps the default.
    `hidden_act` is for raw OpenAI/open_clip files (their weights do not record it; default `quick_gelu`).
    """
    output = prepare_output_dir(output_dir, overwrite)
    checkpoint = load_clip_checkpoint(
        clip_model, trust_torchscript=trust_torchscript, hidden_act=hidden_act or "quick_gelu"
    )
    source_act = checkpoint.config.vision_config.hidden_act
    if hidden_act is not None and checkpoint.source_format in ("folder", "hub") and hidden_act != source_act:
        raise ConversionError(
            f"--hidden_act {hidden_act} contradicts {clip_model}'s config (hidden_act={source_act}); "
            "it only applies to raw OpenAI/open_clip weight files"
        )
    vision_sd, projection = vision_state_dict(checkpoint.state_dict)
    config = build_config(checkpoint.config.vision_config, projection.shape[0], **moa_options)
    processor = MoADepthCLIPImageProcessor(
        size={"height": int(image_size[0]), "width": int(image_size[1])},
        size_divisor=config.vision_config.patch_size,
    )

    layout, checkpoint_format = checkpoint.layout, checkpoint.source_format
    tokenizer_spec = tokenizer or checkpoint.tokenizer_hint or OPENAI_CLIP_TOKENIZER
    prompt_embeddings = compute_prompt_embeddings(
        checkpoint.state_dict, checkpoint.config, load_tokenizer(tokenizer_spec), config.depth_prompts
    )

    torch.manual_seed(seed)
    model = MoADepthCLIPForDepthEstimation(config).eval()
    with torch.no_grad():
        model.vision_model.load_state_dict(vision_sd, strict=True)
        model.semantic_context.image_projection.weight.copy_(projection)
        model.semantic_context.prompt_embeddings.copy_(prompt_embeddings)
    del checkpoint  # the text tower is not kept

    name = model_name or output.name
    card = render_model_card(
        model_name=name,
        model_id=model_id or name,
        base_model=str(clip_model) if checkpoint_format == "hub" else None,
        checkpoint_status=checkpoint_status(str(clip_model), layout, checkpoint_format, seed),
        details={
            **config_details(config, tuple(image_size)),
            "converted from": f"`{_display_name(str(clip_model), checkpoint_format)}` "
            f"({_SOURCE_FORMATS[checkpoint_format]}, {layout} layout)",
            "prompt embeddings": f"text tower of the source, tokenizer `{_display_name(tokenizer_spec)}`",
            "seed of the new modules": str(seed),
            "parameters": parameter_counts(model),
        },
    )

    checks = write_checkpoint(
        output, model, processor, {"README.md": card},
        lambda folder: self_check(folder, model, vision_sd, prompt_embeddings),
    )  # fmt: skip

    return ConversionResult(
        output_dir=output,
        source=str(clip_model),
        layout=layout,
        source_format=checkpoint_format,
        tokenizer=tokenizer_spec,
        config=config,
        parameters=parameter_counts(model),
        checks=checks,
    )


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


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
        "bin_spacing": dict(choices=["linear", "log"], help=f"default {defaults.bin_spacing}"),
        "decoder": dict(choices=["multiscale", "paper"], help=f"default {defaults.decoder}"),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convert_clip_to_moa_depthclip.py",
        description="Convert a CLIP ViT checkpoint into a MoA-DepthCLIP checkpoint folder (vision tower copied "
        "exactly, prompt embeddings from the checkpoint's own text tower, new modules seeded), check it by "
        "reloading it, and optionally publish it to the Hugging Face Hub.",
    )
    parser.add_argument(
        "--clip_model",
        required=True,
        help="CLIP checkpoint: a Hub id (openai/clip-vit-base-patch32), a CLIPModel.save_pretrained folder, an "
        "OpenAI checkpoint (ViT-B-32.pt TorchScript archive or OpenAI-layout state dict) or an open_clip state dict "
        "(.bin/.pt/.safetensors). Plain .pt/.bin pickles are read with torch.load(weights_only=True).",
    )
    parser.add_argument("--output_dir", required=True, help="folder to write; must be empty unless --overwrite")
    parser.add_argument(
        "--overwrite", action="store_true", help="replace the contents of an existing model folder at --output_dir"
    )
    parser.add_argument(
        "--tokenizer",
        default=None,
        help="tokenizer folder or Hub id for the prompts (OpenAI/open_clip files carry none). Default: the "
        f"source folder's own tokenizer, else {OPENAI_CLIP_TOKENIZER}",
    )
    parser.add_argument(
        "--trust_torchscript",
        action="store_true",
        help="OpenAI's .pt files are TorchScript archives. By default only their tensors are read, by a reader that "
        "executes nothing from the file. If that reader refuses an archive, loading it needs torch.jit.load, which "
        "compiles and runs the TorchScript code in the archive and unpickles the objects stored in it: the file is "
        "trusted like a program you run, and a malicious file can execute arbitrary code. This flag allows that; "
        "use it only for files from a source you trust (e.g. OpenAI's own release).",
    )
    parser.add_argument(
        "--hidden_act",
        choices=["quick_gelu", "gelu"],
        default=None,
        help="activation of raw OpenAI/open_clip weights, which do not record it: quick_gelu for OpenAI and "
        "*-quickgelu open_clip models, gelu for other open_clip models (e.g. LAION ViT-B-32). Default quick_gelu; "
        "HF folders carry it in their config",
    )
    parser.add_argument(
        "--seed", type=int, default=0, help="torch.manual_seed before the new modules are built (default 0)"
    )
    parser.add_argument(
        "--image_size", type=int, nargs=2, metavar=("H", "W"), default=[224, 224],
        help="input size of the image processor, multiples of the patch size (default 224 224)",
    )  # fmt: skip

    add_moa_arguments(parser)

    hub = parser.add_argument_group("publishing")
    hub.add_argument(
        "--push_to_hub", default=None, metavar="REPO_ID",
        help="after the conversion, upload the folder with conversion/publish.py (which first loads it in a fresh "
        "process with trust_remote_code=True); token from `hf auth login` or HF_TOKEN",
    )  # fmt: skip
    hub.add_argument("--private", action="store_true", help="create the Hub repository as private")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        return _run(args)
    finally:
        if bars:
            transformers_logging.enable_progress_bar()


def _run(args: argparse.Namespace) -> int:
    try:
        repo_name = args.push_to_hub.split("/")[-1] if args.push_to_hub else None
        result = convert(
            args.clip_model,
            args.output_dir,
            tokenizer=args.tokenizer,
            image_size=tuple(args.image_size),
            trust_torchscript=args.trust_torchscript,
            hidden_act=args.hidden_act,
            seed=args.seed,
            overwrite=args.overwrite,
            model_name=repo_name,
            model_id=args.push_to_hub,
            **moa_options_from_args(args),
        )
        print(result.summary())
        if args.push_to_hub:
            from conversion.publish import PublishError, publish_folder

            try:
                url = publish_folder(result.output_dir, args.push_to_hub, private=args.private)
            except PublishError as error:
                raise ConversionError(f"the folder was written but not published: {error}") from None
            print(f"published: {url}")
    except (ConversionError, ModelCardError, ValueError, OSError) as error:
        print(f"error: {_one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
