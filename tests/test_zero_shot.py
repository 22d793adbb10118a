"""DepthCLIP zero-shot from a converted CLIP (`--zero_shot`): the depth equals DepthCLIP's formula computed here
from the `CLIPModel` itself, and the folder loads in transformers' own tools."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import AutoModelForDepthEstimation, CLIPModel, pipeline

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from conversion import publish  # noqa: E402
from conversion.convert_clip_to_moa_depthclip import main  # noqa: E402
from modeling_moa_depthclip import (  # noqa: E402
    DEPTHCLIP_PROMPTS,
    DepthCLIPConfig,
    DepthCLIPForDepthEstimation,
    MoADepthCLIPDepthEstimationPipeline,
)
from test_conversion import PROMPT_TEXTS, make_clip_tokenizer, tiny_clip_config  # noqa: E402

BINS = [1.00, 1.50, 2.00, 2.25, 2.50, 2.75, 3.00]  # DepthCLIP's depths, metres


@pytest.fixture(scope="module")
def clip_and_folder(tmp_path_factory):
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = tiny_clip_config(tokenizer, vision, projection_dim=16)
    torch.manual_seed(7)
    clip = CLIPModel(config).eval()
    root = tmp_path_factory.mktemp("zero_shot")
    clip.save_pretrained(root / "clip")
    tokenizer.save_pretrained(root / "clip")
    output = root / "depthclip"
    code = main(["--clip_model", str(root / "clip"), "--output_dir", str(output), "--zero_shot",
                 "--image_size", "32", "48"])  # fmt: skip
    assert code == 0
    return clip, tokenizer, output


def depthclip_by_hand(clip, tokenizer, pixel_values):
    """DepthCLIP's rule on a ViT, written from the CLIPModel: patch tokens of the last layer -> post_layernorm ->
    visual projection -> cosine with the prompts' text features -> softmax(100 cos / 0.1) -> expected depth."""
    with torch.no_grad():
        tokens = clip.vision_model(pixel_values=pixel_values, interpolate_pos_encoding=True).last_hidden_state[:, 1:]
        image = F.normalize(clip.visual_projection(clip.vision_model.post_layernorm(tokens)), dim=-1)
        text = clip.get_text_features(**tokenizer(DEPTHCLIP_PROMPTS, padding=True, return_tensors="pt"))
        text = F.normalize(text.pooler_output, dim=-1)
        probs = torch.softmax(100.0 * (image @ text.t()) / 0.1, dim=-1)
        depth = probs @ torch.tensor(BINS)
    height, width = pixel_values.shape[-2:]
    grid = depth.reshape(pixel_values.shape[0], 1, height // 8, width // 8)
    return F.interpolate(grid, size=(height, width), mode="bilinear", align_corners=False)[:, 0]


def test_zero_shot_depth_is_depthclips_formula(clip_and_folder):
    clip, tokenizer, folder = clip_and_folder
    model = AutoModelForDepthEstimation.from_pretrained(folder).eval()
    # its own class and config, not a switch of MoA-DepthCLIP's
    assert type(model) is DepthCLIPForDepthEstimation and type(model.config) is DepthCLIPConfig
    assert model.config.model_type == "depthclip_zero_shot"
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 0
    assert model.config.bin_depths == BINS
    # the tensors a --zero_shot folder has always held, under the same keys
    assert set(model.state_dict()) == {k for k in model.state_dict() if k.startswith("vision_model.")} | {
        "semantic_context.prompt_embeddings", "semantic_context.image_projection.weight"}
    pixels = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(pixels)
    expected = depthclip_by_hand(clip, tokenizer, pixels)
    torch.testing.assert_close(out.predicted_depth, expected, rtol=0, atol=1e-4)
    assert out.prompt_logits.shape == (2, 7, 4, 6) and float(expected.std()) > 0.01  # not a constant map
    # labels give the depth terms of the loss (no bins, no routers here)
    with torch.no_grad():
        loss = model(pixels, labels=torch.full((2, 32, 48), 2.0)).loss_components
    assert set(loss) == {"l1", "silog", "gradient", "ssim", "router_aux"}
    assert loss["l1"].item() == pytest.approx((expected - 2.0).abs().mean().item(), rel=1e-4)


def test_zero_shot_folder_runs_in_the_pipeline_and_with_remote_code(clip_and_folder):
    clip, tokenizer, folder = clip_and_folder
    estimator = pipeline("depth-estimation", model=str(folder), pipeline_class=MoADepthCLIPDepthEstimationPipeline)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 60, 3), dtype=np.uint8))
    result = estimator(image)
    assert result["metric_depth"].shape == (40, 60)
    assert 1.0 - 1e-4 <= result["metric_depth"].min() and result["metric_depth"].max() <= 3.0 + 1e-4
    stock = pipeline("depth-estimation", model=str(folder))(image)  # transformers' own pipeline
    torch.testing.assert_close(stock["predicted_depth"], result["predicted_depth"])
    seen = publish.verify_loads(folder)  # a fresh process without the package, trust_remote_code=True
    assert "transformers_modules" in seen["model_class"] and seen["input_size"] == [32, 48]
    card = (folder / "README.md").read_text()
    assert "DepthCLIP zero-shot baseline, no training" in card and "(1, 1.5, 2, 2.25, 2.5, 2.75, 3) m" in card


def test_zero_shot_refuses_options_it_has_no_use_for(clip_and_folder, tmp_path, capsys):
    _, _, folder = clip_and_folder
    clip_folder = folder.parent / "clip"
    code = main(["--clip_model", str(clip_folder), "--output_dir", str(tmp_path / "x"), "--zero_shot",
                 "--num_experts", "2"])  # fmt: skip
    assert code == 2 and "drop --num_experts" in capsys.readouterr().err


def test_zero_shot_folder_runs_in_the_cli_and_exports_to_onnx(clip_and_folder, nyu_sample_dir, tmp_path):
    pytest.importorskip("onnxruntime")
    from conversion.export_onnx import main as export_main
    from modeling_moa_depthclip.cli.predict import main as cli_main

    _, _, folder = clip_and_folder
    image = nyu_sample_dir / "00000_colors.png"
    assert cli_main(["predict", str(image), "--model", str(folder), "--output-dir", str(tmp_path / "depth")]) == 0
    depth = np.load(tmp_path / "depth" / "00000_colors_depth.npy")
    assert depth.shape == (480, 640) and 1.0 - 1e-4 <= depth.min() and depth.max() <= 3.0 + 1e-4
    assert export_main(["--model", str(folder), "--output", str(tmp_path / "zero_shot.onnx"), "--images", str(image),
                        "--num-images", "1"]) == 0  # fmt: skip
    assert (tmp_path / "zero_shot.onnx").stat().st_size > 0
