"""Broken checkpoints fail with one line naming the file and the reason, in the model class, the auto class and the
pipeline (which would otherwise bury the cause in a multi-line retry report, or load a stranger at random)."""

from __future__ import annotations

import pytest
from safetensors import SafetensorError
from transformers import AutoModelForDepthEstimation, CLIPVisionConfig, CLIPVisionModel, pipeline

from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation
from tiny_models import save_tiny_checkpoint


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
    assert message.startswith(f"{truncated / 'model.safetensors'}: cannot read the weights")
    assert "truncated or corrupt" in message


def test_a_folder_of_another_model_type_is_refused_not_loaded_at_random(tmp_path):
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=16)
    CLIPVisionModel(config).save_pretrained(tmp_path)
    with pytest.raises(ValueError) as error:
        MoADepthCLIPForDepthEstimation.from_pretrained(str(tmp_path))
    assert str(error.value) == (
        f"{tmp_path / 'config.json'}: model_type is 'clip_vision_model', not a 'moa_depthclip' checkpoint"
    )
