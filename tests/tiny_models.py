"""Tiny randomly initialised MoA-DepthCLIP models: the real code paths at a size that runs in milliseconds."""

import torch

from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation, MoADepthCLIPImageProcessor


TINY_VISION = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=2,
    image_size=64,
    patch_size=16,
    projection_dim=32,
)


def tiny_config(**overrides) -> MoADepthCLIPConfig:
    settings = dict(
        vision_config=dict(TINY_VISION),
        moa_layers=[1, 3],
        num_unfrozen_layers=1,
        adapter_bottleneck=8,
        router_hidden_size=16,
        context_dim=16,
        num_depth_bins=16,
        decoder_hidden_size=32,
    )
    settings.update(overrides)
    return MoADepthCLIPConfig(**settings)


def tiny_model(seed: int = 0, **overrides) -> MoADepthCLIPForDepthEstimation:
    """A tiny model whose adapters are not the identity (their zero init is perturbed), in eval mode."""
    torch.manual_seed(seed)
    model = MoADepthCLIPForDepthEstimation(tiny_config(**overrides))
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts.up_" in name:
                parameter.normal_(0.0, 0.05)
    return model.eval()


def tiny_processor(**overrides) -> MoADepthCLIPImageProcessor:
    settings = dict(size={"height": 64, "width": 64}, size_divisor=16)
    settings.update(overrides)
    return MoADepthCLIPImageProcessor(**settings)


def save_tiny_checkpoint(folder, seed: int = 0, **overrides):
    model = tiny_model(seed=seed, **overrides)
    model.save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return model
