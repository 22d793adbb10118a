"""The ablation variants: each builds from a starting model with exactly the parameters its row of the paper trains,
counted here from the configuration's sizes, independently of the model's own trainable mask."""

import pytest
import torch

from modeling_moa_depthclip.training.ablation import ABLATION_VARIANTS, build_variant, variant_config
from tiny_models import tiny_model

D, INTERMEDIATE, P = 64, 128, 32  # tiny_models.TINY_VISION: width, MLP width, projection
BOTTLENECK, ROUTER, CONTEXT, BINS, DECODER = 8, 16, 16, 16, 32  # tiny_config's MoA sizes


def clip_block():
    return 4 * (D * D + D) + 2 * (2 * D) + (D * INTERMEDIATE + INTERMEDIATE) + (INTERMEDIATE * D + D)


def adapters(experts):
    return experts * (D * BOTTLENECK + BOTTLENECK) + experts * BOTTLENECK * D + experts * D


def router(experts, guided):
    return (D * ROUTER + ROUTER) + (CONTEXT * ROUTER if guided else 0) + (ROUTER * experts + experts)


SEMANTIC_CONTEXT = D * P + 1 + (2 * P * CONTEXT + CONTEXT)
PATCH_GRID_DECODER = 2 * D + D * DECODER + DECODER


def head(kind, channels):
    classification = channels * BINS + BINS
    regression = channels + 1
    return {"hybrid": classification + 2 * regression, "classification": classification, "regression": regression}[kind]


def trainable(model):
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.fixture(scope="module")
def start():
    model = tiny_model()  # 2 MoA layers of 4 experts, 1 unfrozen block, multi-scale decoder
    with torch.no_grad():
        model.semantic_context.prompt_embeddings.copy_(torch.nn.functional.normalize(torch.randn(7, P), dim=-1))
    return model


@pytest.mark.parametrize("name", [n for n in ABLATION_VARIANTS if n != "zero_shot"])
def test_each_trained_variant_trains_what_its_row_says(start, name):
    model, fresh = build_variant(start, name, seed=0)
    config = model.config
    experts = config.num_experts
    guided = config.prompt_guided_router and experts > 1
    multiscale = sum(p.numel() for p in model.decoder.parameters()) if config.decoder == "multiscale" else None
    decoder = PATCH_GRID_DECODER if config.decoder == "paper" else multiscale
    expected = (
        clip_block()  # num_unfrozen_layers = 1
        + len(config.moa_layers) * (adapters(experts) if experts else 0)
        + len(config.moa_layers) * (router(experts, config.prompt_guided_router) if experts > 1 else 0)
        + (SEMANTIC_CONTEXT if guided else 0)
        + decoder
        + head(config.head, model.decoder.out_channels)
    )
    assert trainable(model) == expected
    overrides = ABLATION_VARIANTS[name].overrides
    assert {k: getattr(config, k) for k in overrides} == overrides
    # what the starting model has and the variant keeps is carried over exactly
    start_state = start.state_dict()
    for key, value in model.state_dict().items():
        if key not in fresh:
            assert torch.equal(value, start_state[key]), key
    assert not any(k.startswith("vision_model.") for k in fresh)
    # the variant trains: one step moves exactly the parameters counted above (fresh adapters start as the
    # identity, with zero up-projections that would block the gradient of their down-projections in this step)
    with torch.no_grad():
        for key, parameter in model.named_parameters():
            if "experts.up_" in key and key in fresh:
                parameter.normal_(0.0, 0.05)
    model.train()
    out = model(torch.randn(2, 3, 64, 64), labels=1.0 + 3.0 * torch.rand(2, 64, 64))
    out.loss.backward()
    with_grad = sum(p.numel() for p in model.parameters() if p.grad is not None and p.grad.abs().sum() > 0)
    assert with_grad == expected


def test_specific_variants_have_the_parts_they_name(start):
    full, _ = build_variant(start, "full")
    assert trainable(full) == trainable(start) and not _
    assert not list(build_variant(start, "no_adapters")[0].moa.parameters())
    assert not any("context_proj" in n for n, _ in build_variant(start, "no_prompt_guidance")[0].named_parameters())
    l1 = build_variant(start, "l1_loss")[0]
    assert trainable(l1) == trainable(start) and l1.config.loss_weights["silog"] == 0.0
    with torch.no_grad():
        out = l1(torch.randn(1, 3, 64, 64), labels=1.0 + torch.rand(1, 64, 64))
    assert out.loss.item() == pytest.approx(out.loss_components["l1"].item(), rel=1e-6)


def test_zero_shot_variant_has_nothing_to_train_and_only_clip_weights(start):
    model, fresh = build_variant(start, "zero_shot")
    assert trainable(model) == 0 and fresh == []
    clip_tower = sum(p.numel() for n, p in start.named_parameters() if n.startswith("vision_model."))
    assert sum(p.numel() for p in model.parameters()) == clip_tower + D * P  # + CLIP's visual projection
    assert torch.equal(model.prompt_embeddings, start.prompt_embeddings)


def test_unknown_or_inapplicable_variant_is_one_clear_error(start):
    with pytest.raises(ValueError, match=r"unknown ablation variant 'tiny'.*'full'"):
        variant_config(start.config, "tiny")
    other_prompts = tiny_model(depth_prompts=["near", "far"])
    with pytest.raises(ValueError, match="'zero_shot' does not apply.*one depth per prompt"):
        build_variant(other_prompts, "zero_shot")
