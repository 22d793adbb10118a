"""Map a checkpoint of the authors' prototype into a MoA-DepthCLIP checkpoint folder, wherever the architectures match.

    python -m conversion.convert_prototype_checkpoint --checkpoint FILE --output_dir DIR
        (--clip_model SOURCE [--tokenizer T] | --prompt_embeddings FILE) [--adapter_layers 2 5 8 11] [options]

The prototype saved an open_clip ViT image tower (`visual.*`), one MLP adapter per adapted block
(`adapters.{i}.down_project` Linear(768->64), GELU, `adapters.{i}.up_project` Linear(64->768), applied as
`x + adapter(x)` after blocks 2, 5, 8, 11; `i` counts the adapters in block order) and `project_to_text_dim`
(Linear 768->512) feeding its prompt-scoring depth head. What maps, exactly:

* `visual.*` -> `vision_model.*` through `modeling_moa_depthclip.clip.checkpoints`' OpenAI->transformers conversion of the image tower;
* adapter `i` -> the one-expert Mixture-of-Adapters after block `adapter_layers[i]` (`num_experts=1`: the softmax
  over one expert is exactly 1, so the router has no effect and `x + up(gelu(down(x)))` is reproduced exactly);
* `semantic_context.image_projection` (applied to CLIP's `ln_post(CLS)`) <- `visual.proj`, CLIP's own projection of
  that very input; `--image_projection project_to_text_dim` takes the prototype's trained projection instead
  (its bias cannot map: image_projection has none).

What does not map is listed, key by key with the reason, in a printed table and in `conversion_report.json` in
the output folder: the prototype's prompt-scoring head versus the hybrid head, and any key without a counterpart.
The decoder, depth head, routers and context fusion have no prototype counterpart and are initialised from
`--seed`. The prompt embeddings come from a CLIP checkpoint's text tower and tokenizer (`--clip_model`, the CLIP
the prototype was built on) or from a file of precomputed text embeddings (`--prompt_embeddings`).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import defaultdict
from pathlib import Path

if __package__ in (None, ""):
    sys.exit(f"run this from the repository root as a module: python -m conversion.{Path(__file__).stem} ...")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from safetensors.torch import load_file as load_safetensors  # noqa: E402
from torch import nn  # noqa: E402
from transformers.utils import logging as transformers_logging  # noqa: E402

from conversion.common import (  # noqa: E402
    ConversionError,
    add_moa_arguments,
    build_config,
    display_name,
    moa_options_from_args,
    one_line,
    parameter_counts,
    prepare_output_dir,
    self_check,
    write_checkpoint,
)
from conversion.model_card import ModelCardError, config_details, render_model_card  # noqa: E402
from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation  # noqa: E402
from modeling_moa_depthclip.loading import default_image_processor  # noqa: E402
from modeling_moa_depthclip.clip.checkpoints import (  # noqa: E402
    OPENAI_CLIP_TOKENIZER,
    load_clip_checkpoint,
    openai_visual_to_hf,
    unwrap_state_dict,
    vision_state_dict,
)
from modeling_moa_depthclip.clip.initialization import compute_prompt_embeddings, load_tokenizer  # noqa: E402

__all__ = ["PrototypeConversion", "convert_prototype", "load_prototype_state_dict", "main", "map_prototype"]

PROTOTYPE_ADAPTER_LAYERS = [2, 5, 8, 11]  # blocks of the 12-block ViT-B/32 after which the prototype adapts
REPORT_FILE = "conversion_report.json"

_ADAPTER_KEY = re.compile(r"^adapters\.(\d+)\.(down_project|up_project)\.(weight|bias)$")
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")
# keys of the prototype's depth head (prompt scoring over DepthCLIP's 7 bins), recognised by name
_HEAD_KEY = re.compile(r"(text_feat|text_emb|prompt|bin|temperature|logit_scale|depth_values)", re.IGNORECASE)
HEAD_REASON = (
    "part of the prototype's prompt-scoring depth head (softmax over prompt similarities on the patch grid, "
    "depth = weighted DepthCLIP bin values); MoA-DepthCLIP predicts with a hybrid bin-classification + regression "
    "head, which has no counterpart of it and is initialised fresh"
)
NO_COUNTERPART = "no counterpart in MoA-DepthCLIP"
PROJECTION_REASON = (
    "the prototype's head projection of averaged patch tokens into the prompt space; "
    "semantic_context.image_projection projects CLIP's ln_post(CLS) and holds CLIP's own visual.proj "
    "(pass --image_projection project_to_text_dim to use this weight instead)"
)

FRESH_MODULES = {
    "moa.*.router.*": "router: irrelevant with one expert (its softmax is exactly 1), initialised from the seed",
    "semantic_context.fuse.*": "context fusion: the prototype has none, initialised from the seed",
    "semantic_context.logit_scale": "set to log(100), CLIP's zero-shot scale",
    "decoder.*": "the prototype's head has no counterpart (see not_mapped), initialised from the seed",
    "head.*": "hybrid depth head: no counterpart in the prototype, initialised from the seed",
}
ASSUMPTIONS = [
    "adapter activation: GELU with the exact erf form (nn.GELU()), as NOTES.md records for the prototype; the "
    "weights do not record it, and MoA-DepthCLIP's experts use nn.GELU() (checked at conversion)",
    "adapters act on every token (CLS included) of the block's output, as x + up_project(gelu(down_project(x)))",
    "adapters.{i} follows the i-th entry of --adapter_layers (block order)",
]


# --------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------


def load_prototype_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The prototype's weights and the names of the checkpoint file's entries that are not weights.

    `.safetensors`, or `.pt`/`.pth`/`.bin` read with `torch.load(weights_only=True)` (no code runs). A training
    checkpoint `{"model_state_dict"|"state_dict"|"model": {...}, "epoch": ..., ...}` is unwrapped; a
    `module.`/`_orig_mod.` prefix on every key is removed.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"prototype checkpoint not found: {path}")
    if path.suffix.lower() == ".safetensors":
        raw = load_safetensors(str(path), device="cpu")
    elif path.suffix.lower() in (".pt", ".pth", ".bin"):
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:  # weights_only refuses anything but tensors and plain containers
            raise ConversionError(
                f"cannot read {path} with torch.load(weights_only=True): {one_line(error)}"
            ) from None
    else:
        raise ConversionError(
            f"unsupported checkpoint file type {path.suffix!r} (expected .safetensors, .pt, .pth, .bin)"
        )
    if not isinstance(raw, dict):
        raise ConversionError(f"{path} holds a {type(raw).__name__}, not a state dict")
    not_weights: list[str] = []
    for key in _WRAPPER_KEYS:
        if isinstance(raw.get(key), dict) and any(isinstance(v, torch.Tensor) for v in raw[key].values()):
            not_weights = sorted(k for k in raw if k != key)
            raw = raw[key]
            break
    tensors = {k: v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    not_weights += sorted(k for k in raw if k not in tensors)
    if not tensors:
        raise ConversionError(f"{path} holds no tensors")
    state_dict, _ = unwrap_state_dict(tensors)
    return state_dict, not_weights


def load_prompt_embeddings_file(path: str | Path) -> torch.Tensor:
    """A [num_prompts, dim] tensor from `.pt`/`.pth`/`.bin` (a tensor, or a dict holding exactly one),
    `.safetensors` (one tensor, or the key `prompt_embeddings`) or `.npy`."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConversionError(f"prompt embeddings file not found: {path}")
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            value = torch.from_numpy(np.load(path, allow_pickle=False))
        elif suffix == ".safetensors":
            value = load_safetensors(str(path))
        elif suffix in (".pt", ".pth", ".bin"):
            value = torch.load(path, map_location="cpu", weights_only=True)
        else:
            raise ConversionError(f"unsupported prompt embeddings file type {suffix!r} (.pt, .safetensors, .npy)")
    except ConversionError:
        raise
    except Exception as error:
        raise ConversionError(f"cannot read the prompt embeddings {path}: {one_line(error)}") from None
    if isinstance(value, dict):
        tensors = {k: v for k, v in value.items() if isinstance(v, torch.Tensor)}
        if "prompt_embeddings" in tensors:
            value = tensors["prompt_embeddings"]
        elif len(tensors) == 1:
            value = next(iter(tensors.values()))
        else:
            raise ConversionError(
                f"{path} holds {sorted(tensors)}; store one tensor, or name it 'prompt_embeddings'"
            )
    if not isinstance(value, torch.Tensor) or value.dim() != 2 or not value.is_floating_point():
        raise ConversionError(f"{path} must hold a float tensor [num_prompts, dim]")
    if not torch.isfinite(value).all() or (value.norm(dim=-1) == 0).any():
        raise ConversionError(f"{path} holds non-finite values or an all-zero embedding")
    return F.normalize(value.float(), dim=-1)


# --------------------------------------------------------------------------------------------
# Mapping
# --------------------------------------------------------------------------------------------


class PrototypeConversion:
    """The mapping of one prototype state dict: converted tensors plus the report of what mapped and what did not."""

    def __init__(self):
        self.vision = None  # clip_checkpoints.VisualConversion
        self.adapters: list[dict[str, torch.Tensor]] = []  # per adapter: down_weight, down_bias, up_weight, up_bias
        self.image_projection: torch.Tensor | None = None
        self.image_projection_source = "visual.proj"  # or "project_to_text_dim"
        self.mapped: list[dict] = []
        self.not_mapped: list[dict] = []
        self.notes: list[str] = []

    def map(self, source: str, tensor: torch.Tensor, targets: list[str], transform: str = "copy"):
        self.mapped.append({"source": source, "shape": list(tensor.shape), "target": targets, "transform": transform})

    def skip(self, source: str, tensor: torch.Tensor, reason: str):
        self.not_mapped.append({"source": source, "shape": list(tensor.shape), "reason": reason})


def map_prototype(
    state_dict: dict[str, torch.Tensor],
    adapter_layers: list[int] | None = None,
    *,
    image_projection: str = "auto",
    hidden_act: str = "quick_gelu",
) -> tuple[PrototypeConversion, list[int]]:
    """Split a prototype state dict into what maps onto MoA-DepthCLIP and what does not. Returns the mapping and the
    adapter blocks. A vision tower or adapter that does not fit raises `ConversionError`: those load completely or
    not at all."""
    if image_projection not in ("auto", "visual.proj", "project_to_text_dim"):
        raise ConversionError(
            f"--image_projection must be auto, visual.proj or project_to_text_dim, got {image_projection!r}"
        )
    result = PrototypeConversion()
    visual = {k: v for k, v in state_dict.items() if k.startswith("visual.")}
    if not visual:
        raise ConversionError(
            "the checkpoint has no visual.* tensors: not a prototype checkpoint (open_clip image tower)"
        )
    proj_weight = state_dict.get("project_to_text_dim.weight")
    proj_bias = state_dict.get("project_to_text_dim.bias")
    if "visual.proj" not in visual and proj_weight is not None and image_projection == "auto":
        # an image tower saved without CLIP's projection: the prototype's is the only one there is
        visual["visual.proj"] = proj_weight.t()
        image_projection = "project_to_text_dim"
        result.notes.append("the checkpoint has no visual.proj: image_projection holds project_to_text_dim")
    try:
        result.vision = openai_visual_to_hf(visual, hidden_act=hidden_act)
    except ValueError as error:
        raise ConversionError(f"the prototype's image tower (visual.*) does not convert: {one_line(error)}") from None
    vision_config = result.vision.vision_config
    for source, targets in result.vision.key_map.items():
        if targets == ["visual_projection.weight"]:
            continue  # decided below, with project_to_text_dim
        transform = "split q/k/v" if len(targets) == 3 else "copy"
        result.map(source, visual[source], targets, transform)

    # adapters
    grouped: dict[int, dict[str, torch.Tensor]] = defaultdict(dict)
    for key, tensor in state_dict.items():
        if match := _ADAPTER_KEY.match(key):
            grouped[int(match.group(1))][f"{match.group(2)}.{match.group(3)}"] = tensor
    indices = sorted(grouped)
    if indices != list(range(len(indices))):
        raise ConversionError(f"adapter indices {indices} are not 0..{len(indices) - 1}")
    if not indices:
        raise ConversionError("the checkpoint has no adapters.{i}.down_project/up_project tensors")
    if adapter_layers is None:
        if len(indices) == len(PROTOTYPE_ADAPTER_LAYERS) and vision_config.num_hidden_layers == 12:
            adapter_layers = list(PROTOTYPE_ADAPTER_LAYERS)
        else:
            raise ConversionError(
                f"{len(indices)} adapters on a {vision_config.num_hidden_layers}-block tower: pass --adapter_layers "
                "with the block after which each adapter runs"
            )
    adapter_layers = list(adapter_layers)
    if len(adapter_layers) != len(indices):
        raise ConversionError(
            f"--adapter_layers names {len(adapter_layers)} blocks but the checkpoint has {len(indices)} adapters"
        )
    width = vision_config.hidden_size
    bottleneck = None
    for index, layer in zip(indices, adapter_layers):
        parts = grouped[index]
        prefix = f"adapters.{index}"
        for required in ("down_project.weight", "up_project.weight"):
            if required not in parts:
                raise ConversionError(f"{prefix}.{required} is missing")
        down, up = parts["down_project.weight"], parts["up_project.weight"]
        bottleneck = bottleneck or down.shape[0]
        expected = {
            "down_project.weight": (bottleneck, width), "down_project.bias": (bottleneck,),
            "up_project.weight": (width, bottleneck), "up_project.bias": (width,),
        }  # fmt: skip
        wrong = [
            f"{prefix}.{k} {tuple(v.shape)} (expected {expected[k]})"
            for k, v in parts.items()
            if tuple(v.shape) != expected[k]
        ]
        if wrong:
            raise ConversionError(f"adapter shapes do not fit width {width} and bottleneck {bottleneck}: {wrong}")
        target = f"moa.{layer}.experts"
        result.adapters.append({
            "down_weight": down,
            "down_bias": parts.get("down_project.bias", torch.zeros(bottleneck)),
            "up_weight": up,
            "up_bias": parts.get("up_project.bias", torch.zeros(width)),
        })  # fmt: skip
        result.map(f"{prefix}.down_project.weight", down, [f"{target}.down_proj.weight"], "expert 0 rows")
        result.map(f"{prefix}.up_project.weight", up, [f"{target}.up_proj.weight"], "expert 0 columns")
        biases = (("down", "down_proj.bias", "expert 0 rows"), ("up", "up_bias", "row 0 of up_bias"))
        for kind, dst, transform in biases:
            key = f"{prefix}.{kind}_project.bias"
            if key in state_dict:
                result.map(key, state_dict[key], [f"{target}.{dst}"], transform)
            else:
                result.notes.append(f"{key} absent: {target}.{dst} set to zero (a Linear without bias)")

    # image projection: CLIP's visual.proj, or the prototype's project_to_text_dim
    visual_proj = result.vision.visual_projection
    if image_projection == "project_to_text_dim":
        result.image_projection_source = "project_to_text_dim"
    if result.image_projection_source == "project_to_text_dim":
        if proj_weight is None:
            raise ConversionError(
                "--image_projection project_to_text_dim: the checkpoint has no project_to_text_dim.weight"
            )
        if tuple(proj_weight.shape) != tuple(visual_proj.shape):
            raise ConversionError(
                f"project_to_text_dim.weight {tuple(proj_weight.shape)} does not fit image_projection "
                f"{tuple(visual_proj.shape)} (prompt embedding dim x width)"
            )
        result.image_projection = proj_weight
        result.map("project_to_text_dim.weight", proj_weight, ["semantic_context.image_projection.weight"], "copy")
        if "visual.proj" in state_dict:
            result.skip("visual.proj", state_dict["visual.proj"],
                        "CLIP's projection of ln_post(CLS); --image_projection project_to_text_dim used the "
                        "prototype's projection for semantic_context.image_projection instead")  # fmt: skip
        if proj_bias is not None:
            result.skip("project_to_text_dim.bias", proj_bias,
                        f"semantic_context.image_projection has no bias; dropping it changes the projection unless it "
                        f"is zero (max |bias| = {proj_bias.abs().max().item():.3g})")  # fmt: skip
    else:
        result.image_projection = visual_proj
        result.map("visual.proj", state_dict["visual.proj"], ["semantic_context.image_projection.weight"], "transpose")
        for key, tensor in (("project_to_text_dim.weight", proj_weight), ("project_to_text_dim.bias", proj_bias)):
            if tensor is not None:
                result.skip(key, tensor, PROJECTION_REASON)

    handled = set(visual) | {k for k in state_dict if _ADAPTER_KEY.match(k)}
    handled |= {"project_to_text_dim.weight", "project_to_text_dim.bias"}
    for key in sorted(set(state_dict) - handled):
        result.skip(key, state_dict[key], HEAD_REASON if _HEAD_KEY.search(key) else NO_COUNTERPART)
    return result, adapter_layers


def check_adapter_activation(model: MoADepthCLIPForDepthEstimation) -> None:
    """The prototype's adapters use exact (erf) GELU; refuse a model whose experts compute anything else."""
    for name, moa in model.moa.items():
        act = moa.experts.act
        if not (isinstance(act, nn.GELU) and act.approximate == "none"):
            raise ConversionError(
                f"moa.{name}.experts.act is {act!r}, not nn.GELU() (exact erf): the prototype's adapters would not "
                "be reproduced"
            )


def adapter_parity_check(conversion: PrototypeConversion, adapter_layers: list[int]):
    """A check for `self_check`: each reloaded MoA computes exactly the prototype's `x + up(gelu(down(x)))`."""

    def check(model: MoADepthCLIPForDepthEstimation) -> list[str]:
        check_adapter_activation(model)
        width = model.config.vision_config.hidden_size
        generator = torch.Generator().manual_seed(0)
        tokens = torch.randn(2, 5, width, generator=generator)
        context = torch.randn(2, model.config.context_dim, generator=generator)
        worst = 0.0
        for layer, adapter in zip(adapter_layers, conversion.adapters):
            with torch.no_grad():
                ours, gates = model.moa[str(layer)](tokens, context)
            hidden = F.gelu(F.linear(tokens, adapter["down_weight"].float(), adapter["down_bias"].float()))
            expected = tokens + F.linear(hidden, adapter["up_weight"].float(), adapter["up_bias"].float())
            if not torch.equal(gates, torch.ones_like(gates)):
                raise ConversionError(f"moa.{layer}: the one-expert gate is not exactly 1")
            error = (ours - expected).abs().max().item()
            worst = max(worst, error)
            if error > 1e-5:
                raise ConversionError(f"moa.{layer} differs from the prototype's adapter by {error:.3g}")
        return [f"every MoA reproduces the prototype's adapter x + up(gelu(down(x))) (max difference {worst:.1e})"]

    return check


# --------------------------------------------------------------------------------------------
# Conversion
# --------------------------------------------------------------------------------------------


def convert_prototype(
    checkpoint: str | Path,
    output_dir: str | Path,
    *,
    clip_model: str | None = None,
    tokenizer: str | None = None,
    prompt_embeddings: str | Path | None = None,
    adapter_layers: list[int] | None = None,
    image_projection: str = "auto",
    hidden_act: str = "quick_gelu",
    trust_torchscript: bool = False,
    image_size: tuple[int, int] = (224, 224),
    seed: int = 0,
    overwrite: bool = False,
    **moa_options,
) -> dict:
    """Convert a prototype checkpoint into a MoA-DepthCLIP folder; returns the report (also written as
    `conversion_report.json` in the folder)."""
    if (clip_model is None) == (prompt_embeddings is None):
        raise ConversionError(
            "give exactly one source of prompt embeddings: --clip_model (a CLIP checkpoint whose text tower and "
            "tokenizer embed the prompts) or --prompt_embeddings (a file of precomputed embeddings)"
        )
    for fixed in ("moa_layers", "num_experts", "adapter_bottleneck"):
        if moa_options.get(fixed) is not None:
            raise ConversionError(f"{fixed} is set by the prototype's adapters, not an option here")
    output = prepare_output_dir(output_dir, overwrite)
    state_dict, not_weights = load_prototype_state_dict(checkpoint)
    conversion, adapter_layers = map_prototype(
        state_dict, adapter_layers, image_projection=image_projection, hidden_act=hidden_act
    )
    vision = conversion.vision
    bottleneck = conversion.adapters[0]["down_weight"].shape[0]
    config = build_config(
        vision.vision_config, vision.visual_projection.shape[0],
        **{**moa_options, "moa_layers": adapter_layers, "num_experts": 1, "adapter_bottleneck": bottleneck},
    )  # fmt: skip

    # prompt embeddings
    prompts_report: dict = {"prompts": list(config.depth_prompts)}
    if clip_model is not None:
        clip = load_clip_checkpoint(clip_model, trust_torchscript=trust_torchscript, hidden_act=hidden_act)
        if clip.config.projection_dim != config.prompt_embedding_dim:
            raise ConversionError(
                f"--clip_model embeds text in {clip.config.projection_dim} dimensions, the prototype's image "
                f"projection in {config.prompt_embedding_dim}"
            )
        tokenizer_spec = tokenizer or clip.tokenizer_hint or OPENAI_CLIP_TOKENIZER
        embeddings = compute_prompt_embeddings(
            clip.state_dict, clip.config, load_tokenizer(tokenizer_spec), config.depth_prompts
        )
        clip_vision, _ = vision_state_dict(clip.state_dict)
        same = sorted(
            k for k, v in vision.vision_state_dict.items()
            if k in clip_vision and clip_vision[k].shape == v.shape and torch.equal(clip_vision[k].float(), v.float())
        )  # fmt: skip
        prompts_report.update(
            source=f"text tower of --clip_model {display_name(str(clip_model))}",
            tokenizer=display_name(tokenizer_spec),
            vision_tensors_identical_to_clip_model=f"{len(same)} of {len(vision.vision_state_dict)}",
        )
        if not same:
            conversion.notes.append(
                "no vision tensor of the prototype equals --clip_model's: the prompts were embedded by a text tower "
                "that is probably not the one the prototype was built on"
            )
        del clip
    else:
        embeddings = load_prompt_embeddings_file(prompt_embeddings)
        expected = (len(config.depth_prompts), config.prompt_embedding_dim)
        if tuple(embeddings.shape) != expected:
            raise ConversionError(
                f"{prompt_embeddings} holds embeddings of shape {tuple(embeddings.shape)}; expected {expected} "
                "(one row per depth prompt; set the prompts with --depth_prompts)"
            )
        prompts_report.update(source=f"file {Path(prompt_embeddings).name}, L2-normalised")

    processor = default_image_processor(config, image_size)
    torch.manual_seed(seed)
    model = MoADepthCLIPForDepthEstimation(config).eval()
    check_adapter_activation(model)
    with torch.no_grad():
        model.vision_model.load_state_dict(vision.vision_state_dict, strict=True)
        model.semantic_context.image_projection.weight.copy_(conversion.image_projection)
        model.semantic_context.prompt_embeddings.copy_(embeddings)
        for layer, adapter in zip(adapter_layers, conversion.adapters):
            experts = model.moa[str(layer)].experts
            experts.down_proj.weight.copy_(adapter["down_weight"])
            experts.down_proj.bias.copy_(adapter["down_bias"])
            experts.up_proj.weight.copy_(adapter["up_weight"])
            experts.up_bias.copy_(adapter["up_bias"].unsqueeze(0))

    report = {
        "checkpoint": Path(checkpoint).name,
        "adapter_layers": adapter_layers,
        "configuration": {"num_experts": 1, "moa_layers": adapter_layers, "adapter_bottleneck": bottleneck,
                          "image_projection": conversion.image_projection_source},  # fmt: skip
        "assumptions": ASSUMPTIONS,
        "mapped": conversion.mapped,
        "not_mapped": conversion.not_mapped,
        "checkpoint_entries_not_weights": not_weights,
        "initialised_fresh": {**FRESH_MODULES, "seed": seed},
        "prompt_embeddings": prompts_report,
        "notes": conversion.notes,
    }
    name = output.name
    card = render_model_card(
        config=config,
        model_name=name,
        checkpoint_status=(
            "**Converted from the authors' prototype, head not trained.** The CLIP image tower and the "
            f"{len(adapter_layers)} MLP adapters of the prototype checkpoint are mapped exactly (each adapter is a "
            "one-expert Mixture-of-Adapters); the prototype's prompt-scoring head has no counterpart here, so the "
            "decoder and "
            f"hybrid depth head are freshly initialised (seed {seed}) and must be trained before the depth "
            f"predictions mean anything. `{REPORT_FILE}` lists every tensor that was and was not mapped."
        ),
        details={
            **config_details(config, tuple(image_size)),
            "converted from": f"prototype checkpoint `{Path(checkpoint).name}`",
            "prompt embeddings": prompts_report["source"],
            "not mapped": ", ".join(f"`{row['source']}`" for row in conversion.not_mapped) or "nothing",
            "parameters": parameter_counts(model),
        },
    )

    def check_and_report(folder: Path) -> list[str]:
        report["self_check"] = self_check(
            folder, model, vision.vision_state_dict, embeddings, adapter_parity_check(conversion, adapter_layers)
        )
        (folder / REPORT_FILE).write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return report["self_check"]

    write_checkpoint(output, model, processor, {"README.md": card}, check_and_report)
    report["output_dir"] = str(output)
    return report


def format_report(report: dict) -> str:
    """The mapped / not mapped table printed by the command line (block indices folded into `*`)."""
    rows: dict[tuple[str, str], int] = {}
    for row in report["mapped"]:
        source = re.sub(r"\.\d+\.", ".*.", row["source"])
        target = ", ".join(re.sub(r"\.\d+\.", ".*.", t) for t in row["target"])
        rows[(source, f"{target} ({row['transform']})")] = rows.get((source, f"{target} ({row['transform']})"), 0) + 1
    width = max(len(source) for source, _ in rows) + 6
    lines = [f"{'prototype key':<{width}}  MoA-DepthCLIP", f"{'-' * width}  {'-' * 40}"]
    for (source, target), count in rows.items():
        lines.append(f"{source + (f' (x{count})' if count > 1 else ''):<{width}}  {target}")
    lines += ["", f"NOT MAPPED ({len(report['not_mapped'])}):"]
    for row in report["not_mapped"]:
        lines.append(f"  {row['source']} {tuple(row['shape'])}: {row['reason']}")
    if report["checkpoint_entries_not_weights"]:
        lines.append(f"  checkpoint entries that are not weights: {report['checkpoint_entries_not_weights']}")
    lines += ["", "initialised fresh (no prototype counterpart):"]
    lines += [f"  {k}: {v}" for k, v in report["initialised_fresh"].items() if k != "seed"]
    lines += ["", "assumptions:"] + [f"  - {a}" for a in report["assumptions"]]
    lines += [f"note: {n}" for n in report["notes"]]
    lines += ["", f"prompt embeddings: {report['prompt_embeddings']['source']}"]
    lines += [f"self-check: {c}" for c in report.get("self_check", [])]
    lines.append(f"written: {report.get('output_dir')} (report: {REPORT_FILE})")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conversion.convert_prototype_checkpoint",
        description="Map a checkpoint of the authors' prototype (open_clip visual.*, adapters.{i}.down_project/"
        "up_project, project_to_text_dim) into a MoA-DepthCLIP folder with one-expert MoA modules, and report "
        "every tensor that does not map.",
    )
    parser.add_argument("--checkpoint", required=True, help="the prototype's state dict (.pt/.pth/.bin/.safetensors)")
    parser.add_argument("--output_dir", required=True, help="folder to write; must be empty unless --overwrite")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing model folder at --output_dir")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument(
        "--clip_model",
        help="CLIP checkpoint whose text tower and tokenizer embed the depth prompts (the CLIP the prototype was "
        "built on, e.g. openai/clip-vit-base-patch32 or ViT-B-32.pt); any form convert_clip_to_moa_depthclip.py reads",
    )
    source.add_argument(
        "--prompt_embeddings",
        help="file with precomputed text embeddings [num_prompts, dim] of --depth_prompts (.pt/.safetensors/.npy)",
    )
    parser.add_argument("--tokenizer", default=None, help="tokenizer for --clip_model files that carry none")
    parser.add_argument(
        "--adapter_layers", type=int, nargs="+", default=None,
        help="block after which adapters.{i} runs, in order (default 2 5 8 11 for 4 adapters on a 12-block tower)",
    )  # fmt: skip
    parser.add_argument(
        "--image_projection", choices=["auto", "visual.proj", "project_to_text_dim"], default="auto",
        help="what fills semantic_context.image_projection: CLIP's visual.proj (auto; the projection of exactly its "
        "input, ln_post(CLS)) or the prototype's project_to_text_dim (trained on averaged patch tokens; bias dropped)",
    )  # fmt: skip
    parser.add_argument(
        "--hidden_act", choices=["quick_gelu", "gelu"], default="quick_gelu",
        help="the image tower's MLP activation, not recorded in the weights (OpenAI CLIP: quick_gelu)",
    )  # fmt: skip
    parser.add_argument(
        "--trust_torchscript", action="store_true",
        help="for a --clip_model TorchScript archive that the code-free reader refuses: allow torch.jit.load, which "
        "runs the archive's code (trust the file like a program)",
    )  # fmt: skip
    parser.add_argument("--seed", type=int, default=0, help="torch.manual_seed for the new modules (default 0)")
    parser.add_argument("--image_size", type=int, nargs=2, metavar=("H", "W"), default=[224, 224],
                        help="input size of the image processor (default 224 224)")  # fmt: skip
    add_moa_arguments(parser, exclude=("moa_layers", "num_experts", "adapter_bottleneck"))
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        report = convert_prototype(
            args.checkpoint,
            args.output_dir,
            clip_model=args.clip_model,
            tokenizer=args.tokenizer,
            prompt_embeddings=args.prompt_embeddings,
            adapter_layers=args.adapter_layers,
            image_projection=args.image_projection,
            hidden_act=args.hidden_act,
            trust_torchscript=args.trust_torchscript,
            image_size=tuple(args.image_size),
            seed=args.seed,
            overwrite=args.overwrite,
            **{k: v for k, v in moa_options_from_args(args).items()
               if k not in ("moa_layers", "num_experts", "adapter_bottleneck")},
        )  # fmt: skip
    except (ConversionError, ModelCardError, ValueError, OSError) as error:
        print(f"error: {one_line(error)}", file=sys.stderr)
        return 2
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    print(format_report(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
