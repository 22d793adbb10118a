"""Broken checkpoints fail with one line naming the file and the reason, in the model class, the auto class and the
pipeline (which would otherwise bury the cause in a multi-line retry report, or load a stranger at random)."""

from __future__ import annotations

import pytest
from safetensors import SafetensorError
from transformers import AutoModelForDepthEstimation, CLIPVisionConfig, CLIPVisionModel, pipeline

from modeling_moa_depthclip import DepthCLIPConfig, DepthCLIPForDepthEstimation, MoADepthCLIPForDepthEstimation
from modeling_moa_depthclip.loading import ModelLoadError, load_model_and_processor
from tiny_models import TINY_VISION, save_tiny_checkpoint


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    folder = tmp_path_factory.mktemp("truncated")
    save_tiny_checkpoint(folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    return folder


@pytest.mark.parametrize("load", [
    MoADepthCLIPForDepthEstimation.from_pretrained,
    AutoModelForDepthEstimation.from_pretrained,
    lambda folder: pipeline("depth-estimation", model=folder),
], ids=["class", "auto", "pipeline"])
def test_a_truncated_weights_file_is_named(truncated, load):
    with pytest.raises(SafetensorError) as error:
        load(str(truncated))
    message = str(error.value)
    assert "\n" not in message
    # the package's loader wrote it (loading.check_weights), whichever way the model was asked for
    assert message.startswith(f"{truncated / 'model.safetensors'}: cannot read the weights: the file is truncated")


def test_a_folder_of_another_model_type_is_refused_not_loaded_at_random(tmp_path):
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError) as error:  # a ValueError, as transformers raises for a wrong config
        MoADepthCLIPForDepthEstimation.from_pretrained(str(tmp_path))
    assert str(error.value) == (
        f"model {tmp_path} is a 'clip_vision_model' model (not a depth model), not one of this package's "
        "(model_type 'moa_depthclip')"
    )


def test_each_model_class_refuses_the_other_ones_folder(checkpoint, tmp_path):
    zero_shot = tmp_path / "zero_shot"
    DepthCLIPForDepthEstimation(DepthCLIPConfig(vision_config=dict(TINY_VISION))).save_pretrained(zero_shot)
    with pytest.raises(ModelLoadError, match="'depthclip_zero_shot' model \\(a depth model of another type\\)"):
        MoADepthCLIPForDepthEstimation.from_pretrained(str(zero_shot))
    with pytest.raises(ModelLoadError, match="'moa_depthclip' model .*\\(model_type 'depthclip_zero_shot'\\)"):
        DepthCLIPForDepthEstimation.from_pretrained(str(checkpoint))
    # the auto class and the package's loader take either
    assert type(AutoModelForDepthEstimation.from_pretrained(zero_shot)) is DepthCLIPForDepthEstimation
    assert type(load_model_and_processor(zero_shot)[0]) is DepthCLIPForDepthEstimation
    assert type(load_model_and_processor(checkpoint)[0]) is MoADepthCLIPForDepthEstimation
