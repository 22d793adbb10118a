"""Read the common on-disk forms of CLIP weights into a transformers ``CLIPModel`` state dict.

Supported sources (see :func:`load_clip_source`):

* a folder written by ``CLIPModel.save_pretrained`` or a Hub id (``CLIPModel.from_pretrained``);
* an OpenAI-layout state dict (``visual.conv1.weight``, ``transformer.resblocks.N...``) in a
  ``.pt``/``.pth``/``.bin`` pickle or a ``.safetensors`` file, including open_clip checkpoints,
  which use the same key names, possibly under a ``{"state_dict": ...}`` wrapper and/or a
  ``module.`` prefix;
* an OpenAI TorchScript archive (the official ``ViT-B-32.pt`` files), read without running its code;
* a loose HF-layout weights file (``vision_model.*``/``text_model.*``).

:func:`load_clip_checkpoint` also reports the layout and file format it found; :func:`openai_visual_to_hf`
converts an image tower alone (``visual.*`` keys without a text tower, e.g. a fine-tuned open_clip visual).

Only ViT image towers are supported: transformers' ``CLIPVisionModel`` has no counterpart of the
ModifiedResNet towers (RN50, RN101, ...), so those raise ``ValueError``.

Every tensor of a checkpoint is either converted or explicitly listed below as ignored; anything
else is an error, so a checkpoint that does not match the architecture can never load partially.
"""

from __future__ import annotations

import ast
import collections
import io
import json
import math
import os
import pickle
import re
import warnings
import zipfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Literal, NamedTuple

import torch
from safetensors.torch import load_file as load_safetensors
from transformers import CLIPConfig, CLIPModel, CLIPVisionConfig, CLIPVisionModel

from ..utils import is_hub_id

__all__ = [
    "ClipCheckpoint",
    "Layout",
    "OPENAI_CLIP_TOKENIZER",
    "TorchScriptNotTrustedError",
    "TorchScriptReadError",
    "detect_layout",
    "load_clip_checkpoint",
    "load_clip_source",
    "openai_to_hf_clip",
    "openai_visual_to_hf",
    "read_torchscript_state_dict",
    "unwrap_state_dict",
    "vision_state_dict",
    "VisualConversion",
]

Layout = Literal["hf", "openai", "open_clip"]

# Every OpenAI/open_clip CLIP text tower with a 49408-token vocabulary uses this BPE tokenizer.
OPENAI_CLIP_TOKENIZER = "openai/clip-vit-base-patch32"
_OPENAI_VOCAB_SIZE = 49408

# Prefixes added by training wrappers (DistributedDataParallel, torch.compile), not by the model.
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")

# Non-parameter entries that may appear in OpenAI/open_clip state dicts and carry no weights:
#   attn_mask, text.attn_mask -- open_clip's causal text mask, a buffer (persisted by older
#       open_clip versions and by any TorchScript export, which cannot mark buffers non-persistent);
#       transformers rebuilds the causal mask itself.
_IGNORED_OPENAI_BUFFERS = frozenset({"attn_mask", "text.attn_mask"})
# Scalars stored by OpenAI's TorchScript archives; checked against the inferred config, then dropped.
_OPENAI_JIT_METADATA = ("input_resolution", "context_length", "vocab_size")
# position_ids were persistent buffers in transformers < 4.31 checkpoints; 5.x recomputes them.
_IGNORED_HF_BUFFERS = frozenset({"vision_model.embeddings.position_ids", "text_model.embeddings.position_ids"})

_MAX_KEYS_IN_ERROR = 20


# --------------------------------------------------------------------------------------------
# Layout detection and unwrapping
# --------------------------------------------------------------------------------------------


def unwrap_state_dict(obj: Mapping) -> tuple[dict[str, torch.Tensor], bool]:
    """Return ``(flat name -> tensor dict, was_wrapped)``.

    Unwraps open_clip training checkpoints (``{"epoch", "name", "state_dict", "optimizer", ...}``)
    and strips a ``module.``/``_orig_mod.`` prefix when *every* key carries it (a prefix on only
    some keys is left alone so that it surfaces as unexpected keys rather than being guessed at).
    """
    wrapped = False
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj, wrapped = obj["state_dict"], True
    if not isinstance(obj, Mapping):
        raise ValueError(f"expected a mapping of parameter names to tensors, got {type(obj).__name__}")
    non_tensors = sorted(str(k) for k, v in obj.items() if not isinstance(v, torch.Tensor))
    if non_tensors:
        raise ValueError(
            "expected a flat mapping of parameter names to tensors; non-tensor entries: "
            + _truncated(non_tensors)
        )
    sd = dict(obj)
    stripped = True
    while sd and stripped:
        stripped = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in sd):
                sd = {k[len(prefix):]: v for k, v in sd.items()}
                wrapped = stripped = True
    return sd, wrapped


def detect_layout(state_dict: Mapping) -> Layout:
    """Classify CLIP weights as ``"hf"``, ``"openai"`` or ``"open_clip"``.

    open_clip ViT checkpoints (e.g. ``ViT-B-32-quickgelu``) use OpenAI's key names, so a plain
    open_clip state dict is reported as ``"openai"``; ``"open_clip"`` is returned only when an
    open_clip-specific marker is present (a ``state_dict`` wrapper, a ``module.`` prefix, a
    ``text.`` tower prefix or an ``attn_mask`` buffer). Both convert identically.
    """
    sd, wrapped = unwrap_state_dict(state_dict)
    if any(k.startswith(("vision_model.", "text_model.")) for k in sd):
        return "hf"
    if any(k.startswith(("visual.layer1.", "visual.attnpool.")) for k in sd):
        raise ValueError(
            "this is a ResNet-based CLIP (RN50/RN101/...); transformers' CLIPVisionModel is a ViT and "
            "has no equivalent of OpenAI's ModifiedResNet image tower"
        )
    if "visual.conv1.weight" in sd or any(k.startswith("visual.transformer.") for k in sd):
        if wrapped or "text.token_embedding.weight" in sd or not _IGNORED_OPENAI_BUFFERS.isdisjoint(sd):
            return "open_clip"
        return "openai"
    raise ValueError("unrecognised CLIP checkpoint layout; first keys: " + _truncated(sorted(sd), limit=10))


# --------------------------------------------------------------------------------------------
# OpenAI / open_clip -> HF conversion
# --------------------------------------------------------------------------------------------


def openai_to_hf_clip(
    state_dict: Mapping,
    *,
    vision_heads: int | None = None,
    text_heads: int | None = None,
    hidden_act: str = "quick_gelu",
) -> tuple[dict[str, torch.Tensor], CLIPConfig]:
    """Convert an OpenAI- or open_clip-layout CLIP ViT state dict to ``CLIPModel`` keys and config.

    The fused attention ``in_proj_{weight,bias}`` is split into q/k/v (in that order) and the
    ``[width, embed_dim]`` matrices ``visual.proj``/``text_projection`` are transposed into
    ``nn.Linear`` weights. Shapes determine the config, except for what weights cannot encode:

    * heads: OpenAI's code always uses ``width // 64``; pass ``vision_heads``/``text_heads`` for
      models built otherwise (a wrong value still loads but computes different attention);
    * activation: OpenAI and ``*-quickgelu`` open_clip models use QuickGELU; open_clip models
      without ``-quickgelu`` in their name (e.g. the LAION ViT-B-32) need ``hidden_act="gelu"``;
    * ``eos_token_id`` is set to ``vocab_size - 1``: OpenAI pools text at ``argmax(input_ids)``,
      which is the first end-of-text token because EOT is the largest id, and transformers pools
      at the first ``eos_token_id`` -- identical whenever the sequence contains EOT.

    ``logit_scale`` is optional (filled with the config default and a warning) because it is
    unused by image/text features and missing from some open_clip exports. Ignored entries:
    ``attn_mask``/``text.attn_mask`` (causal-mask buffer) and the OpenAI TorchScript scalars
    ``input_resolution``/``context_length``/``vocab_size``, which are checked against the config.
    Any other key that is missing or left over raises ``ValueError`` naming it.
    """
    sd, _ = unwrap_state_dict(state_dict)
    if detect_layout(sd) == "hf":
        raise ValueError("state dict is already in transformers (HF) layout; no conversion needed")
    sd = _lift_open_clip_text_tower(sd)
    metadata = {k: sd.pop(k) for k in _OPENAI_JIT_METADATA if k in sd}

    config = _infer_openai_config(sd, vision_heads, text_heads, hidden_act)
    for key, expected in (
        ("input_resolution", config.vision_config.image_size),
        ("context_length", config.text_config.max_position_embeddings),
        ("vocab_size", config.text_config.vocab_size),
    ):
        if key in metadata and int(metadata[key]) != expected:
            raise ValueError(f"checkpoint stores {key}={int(metadata[key])} but its weights imply {expected}")

    remaining = dict(sd)
    if "logit_scale" not in remaining:
        warnings.warn(
            f"checkpoint has no logit_scale; using the default {config.logit_scale_init_value} "
            "(it only scales contrastive logits, not image/text features)",
            stacklevel=2,
        )
        remaining["logit_scale"] = torch.tensor(config.logit_scale_init_value)

    converted: dict[str, torch.Tensor] = {}
    missing: list[str] = []
    for src, dst, transform in _openai_plan(config):
        if src not in remaining:
            missing.append(src)
            continue
        converted.update(transform(remaining.pop(src), dst))
    unexpected = [k for k in remaining if k not in _IGNORED_OPENAI_BUFFERS]
    if missing or unexpected:
        raise ValueError("CLIP checkpoint does not match the OpenAI ViT layout: " + _key_report(missing, unexpected))
    _check_against_model(converted, config)
    return converted, config


class VisualConversion(NamedTuple):
    """The image tower of an OpenAI-layout checkpoint in transformers form (see :func:`openai_visual_to_hf`)."""

    vision_state_dict: dict[str, torch.Tensor]  # CLIPVisionModel keys (``embeddings.*``, ``encoder.layers.N.*``)
    visual_projection: torch.Tensor  # ``visual_projection.weight``, [projection_dim, hidden_size]
    vision_config: CLIPVisionConfig
    key_map: dict[str, list[str]]  # OpenAI key -> the ``CLIPModel`` keys it became


def openai_visual_to_hf(
    state_dict: Mapping[str, torch.Tensor],
    *,
    vision_heads: int | None = None,
    hidden_act: str = "quick_gelu",
) -> VisualConversion:
    """Convert only the image tower (``visual.*`` keys) of an OpenAI/open_clip-layout CLIP ViT.

    For checkpoints that carry the image tower without a text tower, e.g. models fine-tuned from
    ``open_clip``'s ``model.visual``. Same tensor transforms and config inference as
    :func:`openai_to_hf_clip`; every key must start with ``visual.`` and be converted, otherwise
    ``ValueError`` names the missing and unexpected keys.
    """
    sd = dict(state_dict)
    vision = _infer_openai_vision_config(sd, vision_heads, hidden_act)
    config = CLIPVisionConfig(**vision)
    remaining = dict(sd)
    converted: dict[str, torch.Tensor] = {}
    key_map: dict[str, list[str]] = {}
    missing: list[str] = []
    for src, dst, transform in _openai_vision_plan(config.num_hidden_layers):
        if src not in remaining:
            missing.append(src)
            continue
        out = transform(remaining.pop(src), dst)
        converted.update(out)
        key_map[src] = list(out)
    if missing or remaining:
        raise ValueError(
            "CLIP image tower does not match the OpenAI ViT layout: " + _key_report(missing, list(remaining))
        )
    projection = converted.pop("visual_projection.weight")
    prefix = "vision_model."
    vision_sd = {k[len(prefix):]: v for k, v in converted.items()}
    with torch.device("meta"):
        reference = CLIPVisionModel(config).state_dict()
    mismatched = [
        f"{k}: checkpoint {tuple(vision_sd[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in sorted(reference)
        if k in vision_sd and vision_sd[k].shape != reference[k].shape
    ]
    absent = sorted(set(reference) - set(vision_sd))
    if mismatched or absent:
        raise ValueError(
            "CLIP image tower does not match CLIPVisionModel: "
            + (_key_report([prefix + k for k in absent], []) + "; " if absent else "")
            + (f"shape mismatches {_truncated(mismatched)}" if mismatched else "")
        )
    return VisualConversion(vision_sd, projection, config, key_map)


def _lift_open_clip_text_tower(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # open_clip's CustomTextCLIP keeps the text tower under `text.`; key names inside are OpenAI's.
    if "text.token_embedding.weight" not in sd:
        return sd
    out = {}
    for k, v in sd.items():
        new = k[len("text."):] if k.startswith("text.") and k != "text.attn_mask" else k
        if new in out:
            raise ValueError(f"checkpoint holds both {new!r} and 'text.{new}'")
        out[new] = v
    return out


def _copy(t: torch.Tensor, dst: str) -> dict[str, torch.Tensor]:
    return {dst: t}


def _transpose(t: torch.Tensor, dst: str) -> dict[str, torch.Tensor]:
    # OpenAI applies `x @ proj`; nn.Linear applies `x @ weight.T`.
    return {dst: t.t().contiguous()}


def _split_qkv(t: torch.Tensor, dst: str) -> dict[str, torch.Tensor]:
    if t.shape[0] % 3:
        raise ValueError(f"fused in_proj tensor for {dst} has leading dim {t.shape[0]}, not a multiple of 3")
    # clone: chunks are views of one storage, which safetensors refuses to save as separate tensors.
    q, k, v = (c.clone() for c in t.chunk(3, dim=0))
    return {dst.format("q"): q, dst.format("k"): k, dst.format("v"): v}


def _openai_blocks_plan(src: str, dst: str, n: int):
    for i in range(n):
        s, d = f"{src}.{i}", f"{dst}.{i}"
        for kind in ("weight", "bias"):
            yield f"{s}.attn.in_proj_{kind}", f"{d}.self_attn.{{}}_proj.{kind}", _split_qkv
            for a, b in (("attn.out_proj", "self_attn.out_proj"), ("ln_1", "layer_norm1"),
                         ("mlp.c_fc", "mlp.fc1"), ("mlp.c_proj", "mlp.fc2"), ("ln_2", "layer_norm2")):
                yield f"{s}.{a}.{kind}", f"{d}.{b}.{kind}", _copy


def _openai_vision_plan(num_layers: int) -> list[tuple[str, str, Callable]]:
    """(OpenAI key, ``CLIPModel`` key, transform) for every tensor of the image tower and its projection."""
    v = "vision_model"
    return [
        ("visual.class_embedding", f"{v}.embeddings.class_embedding", _copy),
        ("visual.conv1.weight", f"{v}.embeddings.patch_embedding.weight", _copy),
        ("visual.positional_embedding", f"{v}.embeddings.position_embedding.weight", _copy),
        ("visual.ln_pre.weight", f"{v}.pre_layrnorm.weight", _copy),
        ("visual.ln_pre.bias", f"{v}.pre_layrnorm.bias", _copy),
        *_openai_blocks_plan("visual.transformer.resblocks", f"{v}.encoder.layers", num_layers),
        ("visual.ln_post.weight", f"{v}.post_layernorm.weight", _copy),
        ("visual.ln_post.bias", f"{v}.post_layernorm.bias", _copy),
        ("visual.proj", "visual_projection.weight", _transpose),
    ]


def _openai_plan(config: CLIPConfig) -> list[tuple[str, str, Callable]]:
    """(OpenAI key, HF key, transform) for every tensor ``CLIPModel`` needs."""
    t = "text_model"
    plan = [
        *_openai_vision_plan(config.vision_config.num_hidden_layers),
        ("token_embedding.weight", f"{t}.embeddings.token_embedding.weight", _copy),
        ("positional_embedding", f"{t}.embeddings.position_embedding.weight", _copy),
        *_openai_blocks_plan("transformer.resblocks", f"{t}.encoder.layers", config.text_config.num_hidden_layers),
        ("ln_final.weight", f"{t}.final_layer_norm.weight", _copy),
        ("ln_final.bias", f"{t}.final_layer_norm.bias", _copy),
        ("text_projection", "text_projection.weight", _transpose),
        ("logit_scale", "logit_scale", _copy),
    ]
    return plan


def _infer_openai_config(
    sd: Mapping[str, torch.Tensor], vision_heads: int | None, text_heads: int | None, hidden_act: str
) -> CLIPConfig:
    needed = [
        "visual.conv1.weight", "visual.positional_embedding", "visual.proj",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
        "token_embedding.weight", "positional_embedding", "text_projection",
        "transformer.resblocks.0.mlp.c_fc.weight",
    ]  # fmt: skip
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ValueError("cannot infer the CLIP architecture: " + _key_report(absent, []))

    vision = _infer_openai_vision_config(sd, vision_heads, hidden_act)
    embed_dim = vision["projection_dim"]
    text_vocab, text_width = sd["token_embedding.weight"].shape
    if sd["text_projection"].shape[1] != embed_dim:
        raise ValueError(
            f"image and text embedding sizes differ ({embed_dim} vs {sd['text_projection'].shape[1]}); "
            "CLIPConfig has a single projection_dim"
        )
    text = dict(
        vocab_size=text_vocab,
        hidden_size=text_width,
        intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "transformer.resblocks."),
        num_attention_heads=text_heads or _heads(text_width, "text"),
        max_position_embeddings=sd["positional_embedding"].shape[0],
        projection_dim=embed_dim,
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
        bos_token_id=text_vocab - 2,  # <|startoftext|>, second-to-last id in OpenAI's vocabulary
        eos_token_id=text_vocab - 1,  # <|endoftext|>, the last id
        pad_token_id=0,  # OpenAI's tokenizer pads with 0
    )
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=embed_dim)


def _infer_openai_vision_config(sd: Mapping[str, torch.Tensor], vision_heads: int | None, hidden_act: str) -> dict:
    """``CLIPVisionConfig`` keyword arguments implied by the shapes of an OpenAI-layout image tower."""
    needed = [
        "visual.conv1.weight", "visual.positional_embedding", "visual.proj",
        "visual.transformer.resblocks.0.mlp.c_fc.weight",
    ]  # fmt: skip
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ValueError("cannot infer the CLIP image tower: " + _key_report(absent, []))
    conv = sd["visual.conv1.weight"]
    width, channels, patch, patch_w = conv.shape
    if patch != patch_w:
        raise ValueError(f"non-square patch kernel {tuple(conv.shape[-2:])} is not supported by CLIPVisionModel")
    grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
    if grid * grid + 1 != sd["visual.positional_embedding"].shape[0]:
        raise ValueError("visual.positional_embedding does not hold 1 + a square number of positions")
    return dict(
        hidden_size=width,
        intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        num_hidden_layers=_count_blocks(sd, "visual.transformer.resblocks."),
        num_attention_heads=vision_heads or _heads(width, "vision"),
        num_channels=channels,
        image_size=grid * patch,
        patch_size=patch,
        projection_dim=sd["visual.proj"].shape[1],
        hidden_act=hidden_act,
        layer_norm_eps=1e-5,
    )


def _heads(width: int, tower: str) -> int:
    if width % 64:
        raise ValueError(
            f"{tower} width {width} is not a multiple of 64, so OpenAI's heads = width // 64 rule does not "
            f"apply; pass {tower}_heads explicitly"
        )
    return width // 64


def _count_blocks(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    # max index + 1 (not a count) so that a missing middle block shows up as missing keys.
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in sd if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


# --------------------------------------------------------------------------------------------
# HF layout
# --------------------------------------------------------------------------------------------


def _hf_config_from_state_dict(sd: Mapping[str, torch.Tensor], hidden_act: str) -> CLIPConfig:
    v, t = "vision_model.", "text_model."
    needed = [
        f"{v}embeddings.patch_embedding.weight", f"{v}embeddings.position_embedding.weight",
        f"{v}encoder.layers.0.mlp.fc1.weight", "visual_projection.weight",
        f"{t}embeddings.token_embedding.weight", f"{t}embeddings.position_embedding.weight",
        f"{t}encoder.layers.0.mlp.fc1.weight", "text_projection.weight",
    ]  # fmt: skip
    absent = [k for k in needed if k not in sd]
    if absent:
        raise ValueError("cannot infer the CLIP architecture: " + _key_report(absent, []))
    # Rename the shape-bearing tensors to OpenAI names so that one inference routine serves both.
    conv = sd[f"{v}embeddings.patch_embedding.weight"]
    as_openai = {
        "visual.conv1.weight": conv,
        "visual.positional_embedding": sd[f"{v}embeddings.position_embedding.weight"],
        "visual.proj": sd["visual_projection.weight"].t(),
        "visual.transformer.resblocks.0.mlp.c_fc.weight": sd[f"{v}encoder.layers.0.mlp.fc1.weight"],
        "token_embedding.weight": sd[f"{t}embeddings.token_embedding.weight"],
        "positional_embedding": sd[f"{t}embeddings.position_embedding.weight"],
        "text_projection": sd["text_projection.weight"].t(),
        "transformer.resblocks.0.mlp.c_fc.weight": sd[f"{t}encoder.layers.0.mlp.fc1.weight"],
    }
    layer_prefixes = {
        f"{v}encoder.layers.": "visual.transformer.resblocks.",
        f"{t}encoder.layers.": "transformer.resblocks.",
    }
    for k in sd:  # only so that _count_blocks sees every layer index
        for hf, openai in layer_prefixes.items():
            if k.startswith(hf):
                as_openai[openai + k[len(hf):]] = sd[k]
    return _infer_openai_config(as_openai, None, None, hidden_act)


def _validate_hf(sd: Mapping[str, torch.Tensor], config: CLIPConfig) -> dict[str, torch.Tensor]:
    sd = {k: v for k, v in sd.items() if k not in _IGNORED_HF_BUFFERS}
    _check_against_model(sd, config)
    return sd


def _check_against_model(sd: Mapping[str, torch.Tensor], config: CLIPConfig) -> None:
    """Compare names and shapes with a ``CLIPModel`` built on the meta device (no memory, no init cost)."""
    with torch.device("meta"):
        reference = CLIPModel(config).state_dict()
    missing = [k for k in reference if k not in sd]
    unexpected = [k for k in sd if k not in reference]
    if missing or unexpected:
        raise ValueError("CLIP state dict does not match CLIPModel: " + _key_report(missing, unexpected))
    mismatched = [
        f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(reference[k].shape)}"
        for k in sorted(reference)
        if sd[k].shape != reference[k].shape
    ]
    if mismatched:
        raise ValueError("CLIP state dict shapes do not match CLIPModel: " + _truncated(mismatched))


# --------------------------------------------------------------------------------------------
# Vision tower extraction
# --------------------------------------------------------------------------------------------


def vision_state_dict(clip_state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Split a ``CLIPModel`` state dict into ``(CLIPVisionModel state dict, visual_projection.weight)``.

    The first dict has the ``vision_model.`` prefix removed (transformers 5.x ``CLIPVisionModel``
    keys: ``embeddings.*``, ``pre_layrnorm.*``, ``encoder.layers.N.*``, ``post_layernorm.*``).
    """
    prefix = "vision_model."
    vision = {k[len(prefix):]: v for k, v in clip_state_dict.items() if k.startswith(prefix)}
    vision = {k: v for k, v in vision.items() if k != "embeddings.position_ids"}
    if not vision:
        raise ValueError("no vision_model.* tensors in this state dict; convert it with openai_to_hf_clip first")
    if "visual_projection.weight" not in clip_state_dict:
        raise ValueError("state dict has no visual_projection.weight")
    return vision, clip_state_dict["visual_projection.weight"]


# --------------------------------------------------------------------------------------------
# TorchScript archives without running their code
# --------------------------------------------------------------------------------------------


class TorchScriptReadError(ValueError):
    """The code-free TorchScript reader met something outside the small format subset it accepts."""


class TorchScriptNotTrustedError(ValueError):
    """A TorchScript archive needs ``torch.jit.load`` but ``trust_torchscript`` was not set."""


_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64, "FloatStorage": torch.float32, "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}  # fmt: skip


class _Inert:
    """Base for every object the restricted unpickler hands out: BUILD cannot reach them."""

    def __setstate__(self, state):
        # BUILD on a real tensor would call Tensor.__setstate__ (set_, hooks); refuse it here.
        raise pickle.UnpicklingError(f"unexpected BUILD on {type(self).__name__}")


class _StorageType(_Inert):
    def __init__(self, dtype: torch.dtype):
        self.dtype = dtype


class _StorageRef(_Inert):
    def __init__(self, flat: torch.Tensor):
        self.flat = flat


class _TensorRef(_Inert):
    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor


class _ScriptObject:
    """Inert stand-in for a ``__torch__.*`` class: BUILD stores the attribute dict, nothing runs."""

    qualname = ""

    def __init__(self, *args, **kwargs):
        # The archive format only creates objects with NEWOBJ (no __init__); a call means REDUCE.
        raise pickle.UnpicklingError(f"unexpected call of TorchScript class {self.qualname}")

    def __setstate__(self, state):
        if "state" in self.__dict__:
            raise pickle.UnpicklingError(f"TorchScript object {self.qualname} built twice")
        self.__dict__["state"] = state


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    if not isinstance(storage, _StorageRef):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not an archive storage")
    # as_strided checks the view against the storage size, so bad offsets/strides raise.
    return _TensorRef(storage.flat.as_strided(tuple(size), tuple(stride), offset))


def _identity(value, *_):
    return value


# torch.jit._pickle helpers the TorchScript pickler emits for typed lists/dicts; all are identities.
_JIT_PICKLE_HELPERS = {"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "restore_type_tag"}


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, read_storage: Callable[[str, torch.dtype, int], _StorageRef]):
        super().__init__(io.BytesIO(data))
        self._read_storage = read_storage
        self._types: dict[str, type] = {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            qualname = f"{module}.{name}"
            if qualname not in self._types:
                self._types[qualname] = type(name, (_ScriptObject,), {"qualname": qualname})
            return self._types[qualname]
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(_STORAGE_DTYPES[name])
        if module == "torch.jit._pickle" and name in _JIT_PICKLE_HELPERS:
            return _identity
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], _StorageType)):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r:.100}")
        _, storage_type, key, _location, numel = pid
        return self._read_storage(str(key), storage_type.dtype, int(numel))


_CLASS_LINE = re.compile(r"^class (\w+)\(Module\):\s*$")
_DECL_LINE = re.compile(r"^\s+__(parameters|buffers)__ = (\[.*\])\s*$")


def _is_torchscript_archive(path: Path) -> bool:
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as zf:
        return any(n.endswith("/constants.pkl") or "/code/" in n for n in zf.namelist())


def read_torchscript_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Return what ``torch.jit.load(path).state_dict()`` would, without executing the archive.

    Reads ``data.pkl`` with an unpickler that admits only tensor rebuilding, storages, ordered
    dicts and inert placeholders for ``__torch__`` classes. Which attributes are parameters or
    buffers is taken from the ``__parameters__``/``__buffers__`` lines of the archive's
    ``code/`` files, parsed as text (``ast.literal_eval``), never run. Anything else (quantized
    tensors, custom classes with ``__setstate__``, big-endian archives, ...) raises
    ``TorchScriptReadError``.
    """
    try:
        with zipfile.ZipFile(path) as zf:
            return _read_torchscript(zf)
    except TorchScriptReadError:
        raise
    except Exception as err:  # any parse failure of untrusted bytes is a refusal, not a crash
        raise TorchScriptReadError(f"cannot read TorchScript archive {path} without running it: {err}") from err


def _read_torchscript(zf: zipfile.ZipFile) -> dict[str, torch.Tensor]:
    names = zf.namelist()
    roots = [n[: -len("data.pkl")] for n in names if n.endswith("/data.pkl") and n.count("/") == 1]
    if len(roots) != 1:
        raise TorchScriptReadError("archive does not have exactly one top-level data.pkl")
    root = roots[0]
    if f"{root}byteorder" in names and zf.read(f"{root}byteorder").strip() != b"little":
        raise TorchScriptReadError("only little-endian archives are supported")

    declarations: dict[str, dict[str, list[str]]] = {}
    code = f"{root}code/"
    for name in names:
        if not (name.startswith(code) and name.endswith(".py")):
            continue
        module_path = name[len(code): -len(".py")].replace("/", ".")
        current = None
        for line in zf.read(name).decode("utf-8").splitlines():
            if m := _CLASS_LINE.match(line):
                current = declarations.setdefault(f"{module_path}.{m.group(1)}", {"parameters": [], "buffers": []})
            elif line[:1].strip():
                current = None
            elif current is not None and (m := _DECL_LINE.match(line)):
                current[m.group(1)] = [str(x) for x in ast.literal_eval(m.group(2))]

    storages: dict[str, _StorageRef] = {}

    def read_storage(key: str, dtype: torch.dtype, numel: int) -> _StorageRef:
        if key not in storages:
            raw = zf.read(f"{root}data/{key}")
            nbytes = numel * torch.empty((), dtype=dtype).element_size()
            if len(raw) < nbytes:
                raise TorchScriptReadError(f"storage {key} holds {len(raw)} bytes, expected {nbytes}")
            if not numel:
                flat = torch.empty(0, dtype=dtype)
            elif dtype == torch.bool:  # bytes other than 0/1 are not valid bools
                flat = torch.frombuffer(bytearray(raw[:nbytes]), dtype=torch.uint8) != 0
            else:
                flat = torch.frombuffer(bytearray(raw[:nbytes]), dtype=dtype)
            storages[key] = _StorageRef(flat)
        return storages[key]

    root_object = _RestrictedUnpickler(zf.read(f"{root}data.pkl"), read_storage).load()
    out: dict[str, torch.Tensor] = {}
    active: set[int] = set()

    def collect(obj: _ScriptObject, prefix: str) -> None:
        decl = declarations.get(obj.qualname)
        state = obj.__dict__.get("state")
        if decl is None or not isinstance(state, dict) or id(obj) in active:
            raise TorchScriptReadError(f"cannot interpret TorchScript object {obj.qualname or type(obj).__name__}")
        active.add(id(obj))  # memoised pickles can form cycles; a module tree cannot
        for name in decl["parameters"] + decl["buffers"]:
            value = state.get(name)
            if isinstance(value, _TensorRef):
                out[prefix + name] = value.tensor
            elif value is not None:  # None is an absent optional parameter (e.g. bias=False)
                raise TorchScriptReadError(f"{prefix}{name} is declared a parameter/buffer but is not a tensor")
        for name, value in state.items():
            if isinstance(value, _ScriptObject) and value.qualname in declarations:
                collect(value, f"{prefix}{name}.")
        active.discard(id(obj))

    if not isinstance(root_object, _ScriptObject):
        raise TorchScriptReadError("data.pkl does not hold a TorchScript module")
    collect(root_object, "")
    return out


# --------------------------------------------------------------------------------------------
# Loading sources
# --------------------------------------------------------------------------------------------

_TORCH_SUFFIXES = (".pt", ".pth", ".bin")
_HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "tokenizer_config.json")


class ClipCheckpoint(NamedTuple):
    """What :func:`load_clip_checkpoint` read: the weights, and where and in which form they were found."""

    state_dict: dict[str, torch.Tensor]  # CLIPModel keys
    config: CLIPConfig
    tokenizer_hint: str | None
    layout: Layout  # of the stored weights ("hf" for folders and Hub ids)
    source_format: str  # "folder", "hub", "torchscript", "pickle" or "safetensors"


def load_clip_checkpoint(
    source: str | os.PathLike,
    *,
    trust_torchscript: bool = False,
    hidden_act: str = "quick_gelu",
    local_files_only: bool = False,
) -> ClipCheckpoint:
    """:func:`load_clip_source`, also reporting the layout and file format that were found.

    `local_files_only=True` reads a Hub id from the local cache only (nothing is downloaded)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return ClipCheckpoint(*_load_pretrained(str(path), local_folder=path), "hf", "folder")
    if path.is_file():
        sd, config, layout, source_format = _load_file(
            path, trust_torchscript=trust_torchscript, hidden_act=hidden_act
        )
        return ClipCheckpoint(sd, config, _tokenizer_hint(config), layout, source_format)
    if _looks_like_hub_id(str(source)):
        loaded = _load_pretrained(str(source), local_folder=None, local_files_only=local_files_only)
        return ClipCheckpoint(*loaded, "hf", "hub")
    raise FileNotFoundError(f"CLIP checkpoint not found: {source}")


def load_clip_source(
    source: str | os.PathLike,
    *,
    trust_torchscript: bool = False,
    hidden_act: str = "quick_gelu",
) -> tuple[dict[str, torch.Tensor], CLIPConfig, str | None]:
    """Load CLIP weights from any supported source as ``(CLIPModel state dict, CLIPConfig, tokenizer_hint)``.

    ``source`` is a ``save_pretrained`` folder, a Hub id, or a ``.pt``/``.pth``/``.bin``
    (``torch.load(weights_only=True)``) or ``.safetensors`` file in OpenAI, open_clip or HF layout.

    TorchScript archives (OpenAI's official ``.pt`` files) are first read by
    :func:`read_torchscript_state_dict`, which runs none of the archive's code. Only if that
    reader refuses the archive is ``torch.jit.load`` used -- which deserialises and compiles the
    archive's TorchScript code and unpickles its objects, i.e. trusts the file like running a
    program from its author -- and only with ``trust_torchscript=True``; otherwise
    ``TorchScriptNotTrustedError`` is raised.

    ``hidden_act`` applies to raw OpenAI/open_clip/HF-layout files, whose weights do not record
    the activation (see :func:`openai_to_hf_clip`); folders and Hub ids carry it in their config.

    Tensors keep the checkpoint's dtypes (OpenAI archives mix fp16 and fp32);
    ``CLIPModel.load_state_dict`` casts them to the model's dtype.

    ``tokenizer_hint`` is something ``CLIPTokenizer.from_pretrained`` can load a matching
    tokenizer from: the folder (if it has tokenizer files) or Hub id itself, else
    ``OPENAI_CLIP_TOKENIZER`` for the standard 49408-token CLIP vocabulary, else ``None``.
    """
    checkpoint = load_clip_checkpoint(source, trust_torchscript=trust_torchscript, hidden_act=hidden_act)
    return checkpoint.state_dict, checkpoint.config, checkpoint.tokenizer_hint


def _looks_like_hub_id(source: str) -> bool:
    # a name ending like a weights file is meant as a local file that is missing
    return is_hub_id(source) and not source.endswith((*_TORCH_SUFFIXES, ".safetensors"))


def _load_pretrained(
    source: str, local_folder: Path | None, local_files_only: bool = False
) -> tuple[dict[str, torch.Tensor], CLIPConfig, str | None]:
    model, info = CLIPModel.from_pretrained(source, output_loading_info=True, local_files_only=local_files_only)
    # from_pretrained only warns about missing weights and initialises them randomly; refuse instead.
    unexpected = [k for k in info["unexpected_keys"] if not k.endswith("embeddings.position_ids")]
    mismatched = [str(k) for k in info["mismatched_keys"]]
    if info["missing_keys"] or unexpected or mismatched:
        raise ValueError(
            f"{source} does not hold a complete CLIPModel: "
            + _key_report(sorted(info["missing_keys"]), sorted(unexpected))
            + (f"; shape mismatches: {_truncated(sorted(mismatched))}" if mismatched else "")
        )
    state_dict = dict(model.state_dict())
    if local_folder is None or any((local_folder / f).is_file() for f in _HF_TOKENIZER_FILES):
        hint = source
    else:
        hint = _tokenizer_hint(model.config)
    return state_dict, model.config, hint


def _load_file(
    path: Path, *, trust_torchscript: bool, hidden_act: str
) -> tuple[dict[str, torch.Tensor], CLIPConfig, Layout, str]:
    name = path.name.lower()
    if name.endswith(".safetensors"):
        raw: Mapping = load_safetensors(str(path), device="cpu")
        source_format = "safetensors"
    elif name.endswith(_TORCH_SUFFIXES):
        source_format = "torchscript" if _is_torchscript_archive(path) else "pickle"
        raw = _torch_load(path, trust_torchscript)
    else:
        raise ValueError(f"unsupported CLIP checkpoint file type: {path} (expected .safetensors, .pt, .pth or .bin)")

    layout = detect_layout(raw)
    if layout != "hf":
        return *openai_to_hf_clip(raw, hidden_act=hidden_act), layout, source_format
    sd, _ = unwrap_state_dict(raw)
    config_file = path.parent / "config.json"
    config = None
    if config_file.is_file() and json.loads(config_file.read_text()).get("model_type") == "clip":
        config = CLIPConfig.from_pretrained(str(path.parent))
    if config is None:
        warnings.warn(
            f"no CLIP config.json next to {path}; inferring it from shapes with OpenAI's "
            "heads = width // 64 convention",
            stacklevel=3,
        )
        config = _hf_config_from_state_dict(sd, hidden_act)
    return _validate_hf(sd, config), config, layout, source_format


def _torch_load(path: Path, trust_torchscript: bool) -> Mapping:
    if not _is_torchscript_archive(path):
        # weights_only: a plain pickle could otherwise run arbitrary code on load.
        return torch.load(path, map_location="cpu", weights_only=True)
    try:
        return read_torchscript_state_dict(path)
    except TorchScriptReadError as err:
        if not trust_torchscript:
            raise TorchScriptNotTrustedError(
                f"{path} is a TorchScript archive that the code-free reader cannot handle ({err}). "
                "Loading it needs torch.jit.load, which compiles and runs the TorchScript code and "
                "unpickles the objects stored in the archive, so a malicious file could execute "
                "arbitrary code. Pass trust_torchscript=True only if you trust the file's origin "
                "(e.g. OpenAI's official CLIP release), or re-save its state_dict as .safetensors."
            ) from err
    module = torch.jit.load(str(path), map_location="cpu")
    return {k: v.detach() for k, v in module.state_dict().items()}


def _tokenizer_hint(config: CLIPConfig) -> str | None:
    return OPENAI_CLIP_TOKENIZER if config.text_config.vocab_size == _OPENAI_VOCAB_SIZE else None


# --------------------------------------------------------------------------------------------
# Error formatting
# --------------------------------------------------------------------------------------------


def _truncated(items: list[str], limit: int = _MAX_KEYS_IN_ERROR) -> str:
    shown = ", ".join(items[:limit])
    return f"[{shown}{f', ... and {len(items) - limit} more' if len(items) > limit else ''}]"


def _key_report(missing: list[str], unexpected: list[str]) -> str:
    parts = []
    if missing:
        parts.append(f"missing {len(missing)} key(s) {_truncated(sorted(missing))}")
    if unexpected:
        parts.append(f"unexpected {len(unexpected)} key(s) {_truncated(sorted(unexpected))}")
    return "; ".join(parts)
