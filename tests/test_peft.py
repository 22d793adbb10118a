"""LoRA with peft on MoA-DepthCLIP, as on other transformers models: train, save, reload with `AutoPeftModel`, merge."""

import json
import os

import pytest
import torch

from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation
from modeling_moa_depthclip.data import render_synthetic_scene
from tiny_models import tiny_processor

if os.environ.get("CI", "").lower() == "true":
    import peft  # the test extra installs it: a failure in CI, not a skip
else:
    peft = pytest.importorskip("peft", reason="peft is in the test extra: pip install -e '.[test]'")

# the package's import name: peft imports the base model class from the module the adapter config names, and only
# from packages on its allowlist (transformers, diffusers, ...); this is the one argument the README documents
IMPORT_ALLOWLIST = ["modeling_moa_depthclip"]


def _batch():
    processor = tiny_processor()
    scenes = [render_synthetic_scene(seed, height=64, width=64) for seed in (1, 2)]
    pixel_values = processor([rgb for rgb, _ in scenes])["pixel_values"]
    labels = torch.stack([torch.from_numpy(depth) for _, depth in scenes])
    return pixel_values, labels


def _depth(model, pixel_values):
    model.eval()
    with torch.no_grad():
        return model(pixel_values=pixel_values).predicted_depth


@pytest.mark.parametrize(
    "target_modules", [["q_proj", "v_proj"], ["experts.down_proj", "experts.up_proj"]], ids=["clip-attention", "moa"]
)
def test_a_lora_trains_saves_reloads_with_auto_peft_model_and_merges(checkpoint, tmp_path, target_modules):
    from peft import AutoPeftModel, LoraConfig, get_peft_model

    base = MoADepthCLIPForDepthEstimation.from_pretrained(checkpoint)
    pixel_values, labels = _batch()
    base_depth = _depth(base, pixel_values)

    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=target_modules))
    trainable = [name for name, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in name for name in trainable)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for _ in range(5):
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    lora_depth = _depth(model, pixel_values)
    assert (lora_depth - base_depth).abs().max() > 1e-4  # the adapter learned something

    adapter = tmp_path / "lora"
    model.save_pretrained(adapter)
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == str(checkpoint)
    assert config["auto_mapping"]["parent_library"].startswith("modeling_moa_depthclip.")

    with pytest.raises(ValueError, match="import allowlist"):  # what a user meets without the argument
        AutoPeftModel.from_pretrained(adapter)
    reloaded = AutoPeftModel.from_pretrained(adapter, import_allowlist=IMPORT_ALLOWLIST)
    assert isinstance(reloaded.get_base_model(), MoADepthCLIPForDepthEstimation)
    torch.testing.assert_close(_depth(reloaded, pixel_values), lora_depth, rtol=1e-5, atol=1e-6)

    merged = reloaded.merge_and_unload()
    assert type(merged) is MoADepthCLIPForDepthEstimation
    assert not any("lora_" in name for name, _ in merged.named_parameters())
    torch.testing.assert_close(_depth(merged, pixel_values), lora_depth, rtol=1e-4, atol=1e-5)
    # the merged model is a plain checkpoint again: its keys load without peft
    merged.save_pretrained(tmp_path / "merged")
    again = MoADepthCLIPForDepthEstimation.from_pretrained(tmp_path / "merged")
    torch.testing.assert_close(_depth(again, pixel_values), lora_depth, rtol=1e-4, atol=1e-5)
