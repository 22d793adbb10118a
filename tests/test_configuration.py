import re

import pytest
from transformers import AutoConfig, CLIPVisionConfig

from modeling_moa_depthclip import DEPTHCLIP_BIN_DEPTHS, DEPTHCLIP_PROMPTS, DepthCLIPConfig, MoADepthCLIPConfig
from tiny_models import TINY_VISION, tiny_config


def test_default_is_openai_clip_vit_b32_and_the_papers_design():
    config = MoADepthCLIPConfig()
    vision = config.vision_config
    assert isinstance(vision, CLIPVisionConfig)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (768, 12, 12)
    assert (vision.intermediate_size, vision.patch_size, vision.image_size) == (3072, 32, 224)
    assert vision.hidden_act == "quick_gelu" and vision.layer_norm_eps == 1e-5
    assert config.moa_layers == [2, 5, 8, 11]
    assert config.num_unfrozen_layers == 4 and config.trainable_layer_indices == [8, 9, 10, 11]
    assert (config.num_experts, config.adapter_bottleneck, config.router_type) == (4, 64, "soft")
    assert config.depth_prompts == DEPTHCLIP_PROMPTS and len(DEPTHCLIP_PROMPTS) == 7
    assert DEPTHCLIP_PROMPTS[0] == "This object is giant"
    assert (config.num_depth_bins, config.min_depth, config.max_depth) == (128, 1e-3, 10.0)
    assert config.decoder == "multiscale"
    assert set(config.loss_weights) == {"bin_ce", "l1", "silog", "gradient", "ssim"}


def test_round_trip_through_json_and_auto_config(tmp_path):
    config = tiny_config(router_type="topk", router_top_k=2, bin_spacing="linear", loss_weights={"ssim": 0.0})
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert type(loaded) is MoADepthCLIPConfig
    saved, original = loaded.to_dict(), config.to_dict()
    saved.pop("_name_or_path"), original.pop("_name_or_path")
    assert saved == original
    assert loaded.vision_config.hidden_size == 64 and loaded.loss_weights["ssim"] == 0.0


@pytest.mark.parametrize(
    "overrides, field, allowed",
    [
        (dict(moa_layers=[1, 4]), "moa_layers", "[0, 3]"),
        (dict(moa_layers=[-1]), "moa_layers", "[0, 3]"),
        (dict(moa_layers=[]), "moa_layers", "at least one"),
        (dict(moa_layers=[2, 1]), "moa_layers", "increasing"),
        (dict(num_experts=-1), "num_experts", ">= 0"),
        (dict(head="dpt"), "head", "regression"),
        (dict(head="depthclip"), "head", "'hybrid', 'classification', 'regression'"),  # its own model now
        (dict(adapter_bottleneck=0), "adapter_bottleneck", ">= 1"),
        (dict(num_unfrozen_layers=5), "num_unfrozen_layers", "[0, 4]"),
        (dict(min_depth=10.0, max_depth=10.0), "min_depth", "< max_depth"),
        (dict(min_depth=0.0), "min_depth", "> 0"),
        (dict(num_depth_bins=1), "num_depth_bins", ">= 2"),
        (dict(router_type="hard"), "router_type", "soft"),
        (dict(router_type="topk", router_top_k=5, num_experts=4), "router_top_k", "[1, 4]"),
        (dict(decoder="dpt"), "decoder", "multiscale"),
        (dict(bin_spacing="sqrt"), "bin_spacing", "log"),
        (dict(loss_weights={"edges": 1.0}), "loss_weights", "allowed"),
        (dict(loss_weights={"l1": -1.0}), "loss_weights", ">= 0"),
        (dict(depth_prompts=[]), "depth_prompts", "non-empty"),
        (dict(router_aux_loss="kl"), "router_aux_loss", "balance"),
    ],
)
def test_invalid_values_name_the_field_and_the_allowed_range(overrides, field, allowed):
    with pytest.raises(ValueError) as error:
        tiny_config(**overrides)
    assert field in str(error.value) and allowed in str(error.value)


def test_the_zero_shot_baseline_has_its_own_config_with_depthclips_defaults(tmp_path):
    config = DepthCLIPConfig(vision_config=dict(TINY_VISION))
    assert config.model_type == "depthclip_zero_shot" != MoADepthCLIPConfig.model_type
    assert config.depth_prompts == DEPTHCLIP_PROMPTS and config.bin_depths == DEPTHCLIP_BIN_DEPTHS
    assert (config.logit_scale, config.prompt_temperature) == (100.0, 0.1)
    assert not any(name.startswith(("moa_", "num_experts", "router", "decoder", "head")) for name in config.to_dict())
    config.save_pretrained(tmp_path)
    assert type(AutoConfig.from_pretrained(tmp_path)) is DepthCLIPConfig


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(depth_prompts=["near", "far"]), "bin_depths needs one depth per prompt (2 prompts)"),
        (dict(max_depth=2.0), "bin_depths [2.25, 2.5, 2.75, 3.0] lie outside [min_depth, max_depth]"),
        (dict(prompt_temperature=0.0), "prompt_temperature must be > 0"),
        (dict(loss_weights={"edges": 1.0}), "loss_weights has unknown terms"),
    ],
)
def test_invalid_zero_shot_values_name_the_field(overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        DepthCLIPConfig(vision_config=dict(TINY_VISION), **overrides)
