"""The paper's ablation as named configuration overrides of a starting model.

Each variant is the starting model's configuration with a few fields changed, built with a fixed seed and given
every weight of the starting model whose name and shape it shares (the CLIP tower, its projection and prompt text
features, whatever adapters, decoder and head still fit); what is new starts from its initialisation.
`examples/ablation.py` trains every variant with the same budget and evaluates them on the same frames.

    from modeling_moa_depthclip.training.ablation import ABLATION_VARIANTS, build_variant
    model, fresh = build_variant(start_model, "no_mixture", seed=0)
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field

import torch

from ..configuration_moa_depthclip import MoADepthCLIPConfig
from ..modeling_depthclip import DepthCLIPForDepthEstimation
from ..modeling_moa_depthclip import MoADepthCLIPForDepthEstimation


__all__ = ["ABLATION_VARIANTS", "AblationVariant", "build_variant", "variant_config"]

@dataclass(frozen=True)
class AblationVariant:
    name: str
    paper_row: str  # the row of the paper's comparison this variant stands for
    overrides: dict = field(default_factory=dict)
    trains: bool = True
    # the model the variant is; another class than MoA-DepthCLIP takes the starting config's fields it knows
    model_class: type = MoADepthCLIPForDepthEstimation


_L1_ONLY = {"bin_ce": 0.0, "l1": 1.0, "silog": 0.0, "gradient": 0.0, "ssim": 0.0}

ABLATION_VARIANTS: dict[str, AblationVariant] = {
    variant.name: variant
    for variant in [
        AblationVariant("full", "MoA-DepthCLIP: the starting model's configuration, unchanged"),
        AblationVariant(
            "no_mixture",
            "ViT-B/32 + MLP adapters: one adapter per MoA block, no router (the authors' prototype)",
            {"num_experts": 1},
        ),
        AblationVariant(
            "no_prompt_guidance",
            "Mixture-of-Adapters without prompt guidance: each router sees its token only, not the semantic context",
            {"prompt_guided_router": False},
        ),
        AblationVariant(
            "no_adapters",
            "selective fine-tuning only: no adapters; the unfrozen CLIP blocks, decoder and head train",
            {"num_experts": 0},
        ),
        AblationVariant(
            "classification_head", "hybrid head ablated: depth-bin classification only", {"head": "classification"}
        ),
        AblationVariant("regression_head", "hybrid head ablated: direct regression only", {"head": "regression"}),
        AblationVariant(
            "patch_grid_decoder",
            "the paper's decoder: prediction on the ViT patch grid (7x7 at 224x224), upsampled",
            {"decoder": "paper"},
        ),
        AblationVariant(
            "multiscale_decoder",
            "multi-scale decoder: the MoA layers' features fused with an RGB stem at 1/4 resolution",
            {"decoder": "multiscale"},
        ),
        AblationVariant(
            "l1_loss",
            "L1 loss only instead of the composite loss (bin CE + L1 + SILog + gradient + SSIM)",
            {"loss_weights": _L1_ONLY},
        ),
        AblationVariant(
            "zero_shot",
            "DepthCLIP zero-shot on the same CLIP: 7 prompts, 7 depths, no training",
            trains=False,
            model_class=DepthCLIPForDepthEstimation,
        ),
    ]
}


def variant_config(config: MoADepthCLIPConfig, name: str):
    """`config` with the overrides of the variant `name`, as the config of the variant's model class (a
    `ValueError` names the variants if it is unknown)."""
    if name not in ABLATION_VARIANTS:
        raise ValueError(f"unknown ablation variant {name!r}; known: {list(ABLATION_VARIANTS)}")
    variant = ABLATION_VARIANTS[name]
    config_class = variant.model_class.config_class
    settings = config.to_dict()
    for key in ("architectures", "auto_map", "transformers_version", "model_type", "_name_or_path", "custom_pipelines"):
        settings.pop(key, None)
    if config_class is not type(config):
        fields = inspect.signature(config_class.__init__).parameters
        settings = {key: value for key, value in settings.items() if key in fields}
    settings.update(variant.overrides)
    try:
        return config_class(**settings)
    except ValueError as error:
        raise ValueError(f"ablation variant {name!r} does not apply to this model: {error}") from None


def build_variant(model: MoADepthCLIPForDepthEstimation, name: str, seed: int = 0) -> tuple[torch.nn.Module, list[str]]:
    """The variant `name` of `model`: built from `variant_config` with `torch.manual_seed(seed)`, then given every
    tensor of `model` whose name and shape it shares. Returns it (in eval mode) and the names it did not get."""
    config = variant_config(model.config, name)
    torch.manual_seed(seed)
    variant = ABLATION_VARIANTS[name].model_class(config)
    own = variant.state_dict()
    shared = {k: v for k, v in model.state_dict().items() if k in own and own[k].shape == v.shape}
    variant.load_state_dict(shared, strict=False)
    variant.apply_trainable_mask()
    return variant.eval(), sorted(set(own) - set(shared))
