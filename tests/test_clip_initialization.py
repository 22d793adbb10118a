"""modeling_moa_depthclip.clip.initialization: one routine copies a CLIP checkpoint into a model built from a config
(as `examples/train.py --clip_model` does) and builds the converter's model (`model_from_clip`)."""


import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPModel


from modeling_moa_depthclip import DEPTHCLIP_PROMPTS, MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation  # noqa: E402
from modeling_moa_depthclip.clip.initialization import (  # noqa: E402
    ClipInitializationError,
    init_from_clip,
    model_from_clip,
)
from test_conversion import PROMPT_TEXTS, make_clip_tokenizer, openai_state_dict_for, tiny_clip_config  # noqa: E402

VISION = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act="quick_gelu")  # fmt: skip


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """(folder, CLIPModel): a tiny CLIP saved with save_pretrained, with its own tokenizer."""
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    config = tiny_clip_config(tokenizer, VISION, projection_dim=24)
    torch.manual_seed(3)
    clip = CLIPModel(config).eval()
    folder = tmp_path_factory.mktemp("clip") / "hf-clip"
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, clip


def config_for(**overrides):
    settings = dict(vision_config={**VISION, "projection_dim": 24}, moa_layers=[1, 2], num_unfrozen_layers=1,
                    adapter_bottleneck=8, router_hidden_size=16, context_dim=16, num_depth_bins=16,
                    decoder_hidden_size=32)  # fmt: skip
    return MoADepthCLIPConfig(**{**settings, **overrides})


def test_a_model_built_from_a_config_takes_the_clip_weights_and_keeps_its_trainable_set(hf_clip):
    folder, clip = hf_clip
    torch.manual_seed(0)
    model = MoADepthCLIPForDepthEstimation(config_for())
    head_before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith(("head.", "moa."))}
    trainable_before = {n for n, p in model.named_parameters() if p.requires_grad}
    result = init_from_clip(model, str(folder))
    for key, value in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[key], value), key
    assert torch.equal(model.semantic_context.image_projection.weight, clip.visual_projection.weight)
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    with torch.no_grad():
        inputs = tokenizer(DEPTHCLIP_PROMPTS, padding=True, return_tensors="pt")
        expected = F.normalize(clip.get_text_features(**inputs).pooler_output, dim=-1)
    torch.testing.assert_close(model.semantic_context.prompt_embeddings, expected, rtol=0, atol=1e-6)
    # what CLIP has no counterpart for is left as it was built
    for key, value in head_before.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable_before
    assert (result.layout, result.source_format, result.tokenizer) == ("hf", "folder", str(folder))
    assert "vision tower" in result.describe() and str(folder) in result.describe()


def test_a_mismatched_model_is_refused_naming_each_field_and_left_unchanged(hf_clip):
    folder, _ = hf_clip
    model = MoADepthCLIPForDepthEstimation(
        config_for(vision_config={**VISION, "projection_dim": 24, "hidden_act": "gelu", "patch_size": 16})
    )
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ClipInitializationError, match=r"hidden_act: model gelu vs CLIP quick_gelu") as error:
        init_from_clip(model, str(folder))
    assert "patch_size: model 16 vs CLIP 8" in str(error.value)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_every_source_form_goes_through_the_same_routine(tmp_path):
    # an OpenAI-layout file with no tokenizer of its own: the tokenizer is named
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    tokenizer_dir = tmp_path / "tokenizer"
    tokenizer.save_pretrained(tokenizer_dir)
    path = tmp_path / "ViT-tiny.pt"
    torch.save(openai_state_dict_for(tokenizer), path)
    built, result = model_from_clip(path, tokenizer=str(tokenizer_dir), seed=4, moa_layers=[0, 1],
                                    num_unfrozen_layers=1)  # fmt: skip
    assert (result.layout, result.source_format, result.source) == ("openai", "pickle", str(path))
    # the same checkpoint into a model built from the config the converter chose gives the same weights
    torch.manual_seed(4)
    fresh = MoADepthCLIPForDepthEstimation(built.config)
    init_from_clip(fresh, path, tokenizer=str(tokenizer_dir))
    for key, value in built.state_dict().items():
        assert torch.equal(fresh.state_dict()[key], value), key
    with pytest.raises(ClipInitializationError, match="cannot load the tokenizer"):
        init_from_clip(fresh, path, tokenizer=str(tmp_path / "nowhere"))
