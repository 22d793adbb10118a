"""Turn a CLIP checkpoint into a MoA-DepthCLIP checkpoint folder.

    python -m conversion.convert_clip_to_moa_depthclip --clip_model SOURCE --output_dir DIR [options]

SOURCE is any CLIP ViT checkpoint `modeling_moa_depthclip.clip.checkpoints` reads: a Hub id (`openai/clip-vit-base-patch32`)
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

`--zero_shot` writes DepthCLIP's zero-shot baseline on the same CLIP instead (`DepthCLIPForDepthEstimation`, model
type `depthclip_zero_shot`: the vision tower, its projection and the text features of the seven DepthCLIP prompts,
no adapters, no decoder, nothing to train; see `DepthCLIPConfig`), which the pipeline, the evaluation and the
exporters run like any other checkpoint.

The folder is written to a temporary sibling first, reloaded and checked (prompt embeddings, vision weights and
every other tensor equal what was meant to be written), and only then moved into place.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.exit(f"run this from the repository root as a module: python -m conversion.{Path(__file__).stem} ...")

from transformers.utils import logging as transformers_logging  # noqa: E402

from conversion.common import (  # noqa: E402
    SOURCE_FORMATS,
    ConversionError,
    add_moa_arguments,
    display_name,
    moa_config_kwargs,
    moa_options_from_args,
    one_line,
    parameter_counts,
    prepare_output_dir,
    self_check,
    write_checkpoint,
)
from conversion.model_card import ModelCardError, config_details, render_model_card  # noqa: E402
from modeling_moa_depthclip import (  # noqa: E402
    DepthCLIPConfig,
    DepthCLIPForDepthEstimation,
    MoADepthCLIPConfig,
    MoADepthCLIPForDepthEstimation,
)
from modeling_moa_depthclip.clip.checkpoints import OPENAI_CLIP_TOKENIZER  # noqa: E402
from modeling_moa_depthclip.clip.initialization import model_from_clip  # noqa: E402
from modeling_moa_depthclip.loading import default_image_processor  # noqa: E402

__all__ = ["ConversionResult", "build_parser", "checkpoint_status", "convert", "main"]


@dataclass
class ConversionResult:
    output_dir: Path
    source: str
    layout: str
    source_format: str
    tokenizer: str
    config: MoADepthCLIPConfig | DepthCLIPConfig
    parameters: str
    checks: list[str] = field(default_factory=list)

    def summary(self) -> str:
        vision = self.config.vision_config
        return "\n".join(
            [
                f"converted {self.source} ({SOURCE_FORMATS[self.source_format]}, {self.layout} layout)",
                f"  output dir:        {self.output_dir}",
                f"  vision tower:      {vision.num_hidden_layers} blocks, width {vision.hidden_size}, "
                f"patch {vision.patch_size}, {vision.hidden_act}",
                f"  prompt embeddings: {len(self.config.depth_prompts)} x {self.config.prompt_embedding_dim} "
                f"(text tower of the source, tokenizer {self.tokenizer})",
                (
                    f"  MoA:               blocks {self.config.moa_layers}, {self.config.num_experts} experts, "
                    f"bottleneck {self.config.adapter_bottleneck}; decoder {self.config.decoder}"
                    if not isinstance(self.config, DepthCLIPConfig)
                    else f"  head:              DepthCLIP zero-shot, prompt depths {self.config.bin_depths} m"
                ),
                f"  parameters:        {self.parameters}",
                *(f"  self-check:        {check}" for check in self.checks),
            ]
        )


# MoA options that mean nothing for the zero-shot model (it has no adapters, decoder or bins)
_NOT_ZERO_SHOT = ("moa_layers", "num_experts", "adapter_bottleneck", "num_unfrozen_layers", "num_depth_bins",
                  "bin_spacing", "decoder")  # fmt: skip


def checkpoint_status(source: str, layout: str, source_format: str, seed: int, zero_shot: bool = False) -> str:
    if zero_shot:
        return (
            f"**DepthCLIP zero-shot baseline, no training.** This checkpoint was written by "
            f"`python -m conversion.convert_clip_to_moa_depthclip --zero_shot` from the CLIP checkpoint "
            f"`{display_name(source, source_format)}` ({SOURCE_FORMATS[source_format]}, {layout} layout). It scores "
            f"every image patch against CLIP text features of the DepthCLIP prompts and predicts the "
            f"probability-weighted prompt depths (`DepthCLIPForDepthEstimation`); it has no trainable part. It is the "
            f"baseline of the paper's comparison, not MoA-DepthCLIP."
        )
    return (
        f"**Converted, not trained.** This checkpoint was written by `conversion/convert_clip_to_moa_depthclip.py` "
        f"from the CLIP checkpoint `{display_name(source, source_format)}` ({SOURCE_FORMATS[source_format]}, "
        f"{layout} layout). Its vision tower and visual projection are that checkpoint's weights and its prompt "
        f"embeddings come from that checkpoint's text tower; the Mixture-of-Adapters, semantic-context fusion, "
        f"decoder and depth head are freshly initialised (seed {seed}) and untrained, so its depth predictions "
        f"mean nothing until it is fine-tuned (see *Training recipe*)."
    )


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
    zero_shot: bool = False,
    **moa_options,
) -> ConversionResult:
    """Convert the CLIP checkpoint `clip_model` into a MoA-DepthCLIP folder at `output_dir` (see the module doc).

    `moa_options` are the `MoADepthCLIPConfig` fields of :data:`MOA_OPTIONS`; None keeps the default.
    `hidden_act` is for raw OpenAI/open_clip files (their weights do not record it; default `quick_gelu`).
    `zero_shot` writes the DepthCLIP zero-shot model (`DepthCLIPForDepthEstimation`) instead.
    """
    config_kwargs = moa_config_kwargs(moa_options)
    if zero_shot:
        conflicting = [f"--{name}" for name in _NOT_ZERO_SHOT if name in config_kwargs]
        if conflicting:
            raise ConversionError(
                f"--zero_shot writes DepthCLIP's zero-shot model, which has no adapters, decoder or depth bins: "
                f"drop {' '.join(conflicting)}"
            )
    output = prepare_output_dir(output_dir, overwrite)
    model, clip = model_from_clip(
        clip_model, seed=seed, tokenizer=tokenizer, trust_torchscript=trust_torchscript, hidden_act=hidden_act,
        model_class=DepthCLIPForDepthEstimation if zero_shot else MoADepthCLIPForDepthEstimation, **config_kwargs,
    )  # fmt: skip
    config = model.config
    processor = default_image_processor(config, image_size)
    layout, checkpoint_format, tokenizer_spec = clip.layout, clip.source_format, clip.tokenizer

    name = model_name or output.name
    card = render_model_card(
        config=config,
        model_name=name,
        model_id=model_id or name,
        base_model=str(clip_model) if checkpoint_format == "hub" else None,
        checkpoint_status=checkpoint_status(str(clip_model), layout, checkpoint_format, seed, zero_shot),
        details={
            **config_details(config, tuple(image_size)),
            "converted from": f"`{display_name(str(clip_model), checkpoint_format)}` "
            f"({SOURCE_FORMATS[checkpoint_format]}, {layout} layout)",
            "prompt embeddings": f"text tower of the source, tokenizer `{display_name(tokenizer_spec)}`",
            "seed of the new modules": str(seed),
            "parameters": parameter_counts(model),
        },
    )

    checks = write_checkpoint(
        output, model, processor, {"README.md": card},
        lambda folder: self_check(folder, model, clip.vision_state_dict, clip.prompt_embeddings),
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conversion.convert_clip_to_moa_depthclip",
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
    parser.add_argument(
        "--zero_shot", action="store_true",
        help="write DepthCLIP's zero-shot baseline on this CLIP (the 7 DepthCLIP prompts and depths, no adapters, "
        "nothing trained) instead of a MoA-DepthCLIP model to fine-tune",
    )  # fmt: skip

    hub = parser.add_argument_group("publishing")
    hub.add_argument(
        "--push_to_hub", default=None, metavar="REPO_ID",
        help="after the conversion, upload the folder with conversion.publish (which first loads it in a fresh "
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
            zero_shot=args.zero_shot,
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
    except (ModelCardError, ValueError, OSError) as error:  # ConversionError and ClipInitializationError included
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
