"""Initialise a MoA-DepthCLIP model from a pretrained CLIP checkpoint, in every form `clip_checkpoints` reads.

What comes from CLIP:

* the vision tower, copied exactly into `vision_model` (a stock `CLIPVisionModel`);
* CLIP's visual projection, into `semantic_context.image_projection`;
* `semantic_context.prompt_embeddings`: the L2-normalised CLIP text features of `config.depth_prompts`, computed
  with the same checkpoint's text tower and a tokenizer that belongs to it (the text tower is not kept).

Everything else keeps the initialisation it was built with. `conversion/convert_clip_to_moa_depthclip.py`
(`model_from_clip`) and `examples/train.py --clip_model` (`init_from_clip`) both go through here.
"""

from __future__ import annotations

import copy
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AutoTokenizer, CLIPConfig, CLIPModel, CLIPTokenizer, CLIPVisionConfig

from .checkpoints import OPENAI_CLIP_TOKENIZER, ClipCheckpoint, load_clip_checkpoint, vision_state_dict
from ..configuration_moa_depthclip import MoADepthCLIPConfig
from ..modeling_depthclip import DepthCLIPForDepthEstimation
from ..modeling_moa_depthclip import MoADepthCLIPForDepthEstimation


__all__ = [
    "ClipInitialization",
    "ClipInitializationError",
    "compute_prompt_embeddings",
    "config_from_clip",
    "init_from_clip",
    "load_clip",
    "load_tokenizer",
    "model_from_clip",
]

# CLIPVisionConfig fields that must agree for CLIP's weights to mean the same thing in the model
_VISION_FIELDS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_channels",
    "patch_size",
    "image_size",
    "hidden_act",
    "layer_norm_eps",
)


class ClipInitializationError(ValueError):
    """A CLIP checkpoint or tokenizer that cannot initialise the model, with the reason in one line."""


@dataclass
class ClipInitialization:
    """What `init_from_clip` copied, and from where."""

    source: str
    layout: str  # "hf", "openai" or "open_clip"
    source_format: str  # "folder", "hub", "torchscript", "pickle" or "safetensors"
    tokenizer: str
    vision_state_dict: dict
    image_projection: torch.Tensor
    prompt_embeddings: torch.Tensor

    def describe(self) -> str:
        return (
            f"vision tower ({len(self.vision_state_dict)} tensors), visual projection and the text features of "
            f"{self.prompt_embeddings.shape[0]} depth prompts from {self.source} ({self.layout} layout, "
            f"{self.source_format}; tokenizer {self.tokenizer})"
        )


def load_clip(
    source: str | os.PathLike | ClipCheckpoint,
    *,
    trust_torchscript: bool = False,
    hidden_act: str | None = None,
    local_files_only: bool = False,
) -> ClipCheckpoint:
    """Read a CLIP checkpoint (see `clip_checkpoints.load_clip_checkpoint`); an already read one is returned as is.

    `hidden_act` is for raw OpenAI/open_clip files, whose weights do not record it (default `quick_gelu`); it must
    not contradict the config of a transformers folder or Hub id.
    """
    if isinstance(source, ClipCheckpoint):
        return source
    checkpoint = load_clip_checkpoint(
        source,
        trust_torchscript=trust_torchscript,
        hidden_act=hidden_act or "quick_gelu",
        local_files_only=local_files_only,
    )
    source_act = checkpoint.config.vision_config.hidden_act
    if hidden_act is not None and checkpoint.source_format in ("folder", "hub") and hidden_act != source_act:
        raise ClipInitializationError(
            f"--hidden_act {hidden_act} contradicts {source}'s config (hidden_act={source_act}); "
            "it only applies to raw OpenAI/open_clip weight files"
        )
    return checkpoint


def config_from_clip(
    vision_config: CLIPVisionConfig, projection_dim: int, config_class=MoADepthCLIPConfig, **config_kwargs
):
    """`config_class` (`MoADepthCLIPConfig` or `DepthCLIPConfig`) on a CLIP vision tower whose visual projection has
    `projection_dim` outputs; `config_kwargs` set the other fields (unset ones keep the config's defaults)."""
    vision = copy.deepcopy(vision_config)
    vision.projection_dim = projection_dim
    vision.dtype = None  # the model is built in float32 whatever dtype the source was stored in
    return config_class(vision_config=vision, prompt_embedding_dim=projection_dim, **config_kwargs)


def load_tokenizer(spec: str, local_files_only: bool = False):
    """The CLIP tokenizer of a folder or Hub id (AutoTokenizer, or CLIPTokenizer for bare vocab/merges files)."""
    try:
        return AutoTokenizer.from_pretrained(spec, local_files_only=local_files_only)
    except (OSError, ValueError, KeyError, TypeError) as auto_error:
        try:
            return CLIPTokenizer.from_pretrained(spec, local_files_only=local_files_only)
        except (OSError, ValueError, KeyError, TypeError):
            reason = " ".join(str(auto_error).split()) or type(auto_error).__name__
            raise ClipInitializationError(
                f"cannot load the tokenizer {spec!r} ({reason}); OpenAI and open_clip checkpoints "
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
        raise ClipInitializationError(
            f"depth prompts {too_long} are longer than the text tower's {text_config.max_position_embeddings} tokens"
        )
    if int(input_ids.max()) >= text_config.vocab_size:
        raise ClipInitializationError(
            f"the tokenizer produces token id {int(input_ids.max())} but the text tower's vocabulary has "
            f"{text_config.vocab_size} entries: the tokenizer does not belong to this CLIP checkpoint"
        )
    eos = tokenizer.eos_token_id
    if eos is None or not (input_ids == eos).any(dim=1).all():
        raise ClipInitializationError("the tokenizer does not end every prompt with an end-of-text token")
    tokenizer_eos_position = (input_ids == eos).int().argmax(dim=1)
    if text_config.eos_token_id == 2:  # legacy CLIP configs: the text tower pools at the largest id
        pooled_position = input_ids.argmax(dim=1)
    else:
        pooled_position = (input_ids == text_config.eos_token_id).int().argmax(dim=1)
    if not torch.equal(pooled_position, tokenizer_eos_position):
        raise ClipInitializationError(
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


@torch.no_grad()
def init_from_clip(
    model: MoADepthCLIPForDepthEstimation | DepthCLIPForDepthEstimation,
    clip: str | os.PathLike | ClipCheckpoint,
    *,
    tokenizer: str | None = None,
    trust_torchscript: bool = False,
    hidden_act: str | None = None,
    local_files_only: bool = False,
) -> ClipInitialization:
    """Copy the CLIP checkpoint `clip` (a source `load_clip` reads, or a checkpoint it read) into `model`.

    `tokenizer` embeds the prompts; default: the source folder's own tokenizer, else the OpenAI CLIP tokenizer
    for checkpoints with its vocabulary. Raises `ClipInitializationError` naming every field of the model's vision
    config that the checkpoint does not match; the model is unchanged then.
    """
    checkpoint = load_clip(
        clip, trust_torchscript=trust_torchscript, hidden_act=hidden_act, local_files_only=local_files_only
    )
    source = str(clip) if not isinstance(clip, ClipCheckpoint) else "the given CLIP checkpoint"
    ours, theirs = model.config.vision_config, checkpoint.config.vision_config
    mismatched = [
        f"{name}: model {getattr(ours, name)} vs CLIP {getattr(theirs, name)}"
        for name in _VISION_FIELDS
        if getattr(ours, name) != getattr(theirs, name)
    ]
    vision_sd, projection = vision_state_dict(checkpoint.state_dict)
    if tuple(projection.shape) != tuple(model.semantic_context.image_projection.weight.shape):
        mismatched.append(
            f"visual projection: model {tuple(model.semantic_context.image_projection.weight.shape)} vs CLIP "
            f"{tuple(projection.shape)}"
        )
    if mismatched:
        raise ClipInitializationError(f"{source} does not match the model's config ({'; '.join(mismatched)})")

    tokenizer_spec = tokenizer or checkpoint.tokenizer_hint or OPENAI_CLIP_TOKENIZER
    prompt_embeddings = compute_prompt_embeddings(
        checkpoint.state_dict,
        checkpoint.config,
        load_tokenizer(tokenizer_spec, local_files_only=local_files_only),
        model.config.depth_prompts,
    )
    model.vision_model.load_state_dict(vision_sd, strict=True)
    model.semantic_context.image_projection.weight.copy_(projection)
    model.semantic_context.prompt_embeddings.copy_(prompt_embeddings)
    model.apply_trainable_mask()
    return ClipInitialization(
        source=source,
        layout=checkpoint.layout,
        source_format=checkpoint.source_format,
        tokenizer=tokenizer_spec,
        vision_state_dict=vision_sd,
        image_projection=projection,
        prompt_embeddings=prompt_embeddings,
    )


def model_from_clip(
    clip: str | os.PathLike | ClipCheckpoint,
    *,
    seed: int = 0,
    tokenizer: str | None = None,
    trust_torchscript: bool = False,
    hidden_act: str | None = None,
    local_files_only: bool = False,
    model_class=MoADepthCLIPForDepthEstimation,
    **config_kwargs,
) -> tuple[MoADepthCLIPForDepthEstimation | DepthCLIPForDepthEstimation, ClipInitialization]:
    """A new `model_class` (MoA-DepthCLIP, or the DepthCLIP zero-shot baseline) on the checkpoint's vision tower
    (`config_from_clip(clip, **config_kwargs)`), its new modules seeded with `seed`, initialised from the
    checkpoint by `init_from_clip`; in eval mode."""
    checkpoint = load_clip(
        clip, trust_torchscript=trust_torchscript, hidden_act=hidden_act, local_files_only=local_files_only
    )
    _, projection = vision_state_dict(checkpoint.state_dict)
    config = config_from_clip(
        checkpoint.config.vision_config, projection.shape[0], model_class.config_class, **config_kwargs
    )
    torch.manual_seed(seed)
    model = model_class(config).eval()
    initialization = init_from_clip(model, checkpoint, tokenizer=tokenizer, local_files_only=local_files_only)
    initialization.source = str(clip) if not isinstance(clip, ClipCheckpoint) else initialization.source
    return model, initialization
