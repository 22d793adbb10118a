import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DepthEstimationPipeline, pipeline

from modeling_moa_depthclip import ImageLoadError, MoADepthCLIPDepthEstimationPipeline
from tiny_models import save_tiny_checkpoint


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(level=logging.ERROR)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_pipeline_turns_a_real_nyu_frame_into_metric_depth(checkpoint, nyu_sample_dir):
    records = _Records()
    logging.getLogger("transformers").addHandler(records)
    try:
        depth_estimator = pipeline("depth-estimation", model=str(checkpoint))
    finally:
        logging.getLogger("transformers").removeHandler(records)
    assert not records.messages, records.messages
    assert isinstance(depth_estimator, MoADepthCLIPDepthEstimationPipeline)
    result = depth_estimator(str(nyu_sample_dir / "00000_colors.png"))
    depth = result["metric_depth"]
    assert isinstance(depth, np.ndarray) and depth.dtype == np.float32 and depth.shape == (480, 640)
    assert np.array_equal(depth, result["predicted_depth"].numpy())
    assert 1e-3 <= depth.min() and depth.max() <= 10.0
    assert result["colored_depth"].mode == "RGB" and result["colored_depth"].size == (640, 480)
    assert result["depth"].mode == "L" and result["depth"].size == (640, 480)


def test_constant_depth_gives_a_black_image_not_a_division_by_zero(tmp_path):
    model = save_tiny_checkpoint(tmp_path)
    with torch.no_grad():  # a head with zero weights predicts the same depth everywhere
        for parameter in model.head.parameters():
            parameter.zero_()
    model.save_pretrained(tmp_path)
    image = Image.new("RGB", (40, 30), (90, 120, 30))
    with np.errstate(all="raise"):
        result = pipeline("depth-estimation", model=str(tmp_path))(image)
    depth = result["metric_depth"]
    assert np.allclose(depth, depth.flat[0]) and np.isfinite(depth).all()
    assert np.asarray(result["depth"]).max() == 0
    with pytest.raises(FloatingPointError), np.errstate(all="raise"):
        # the stock pipeline divides by max - min == 0 here
        DepthEstimationPipeline.postprocess(
            pipeline("depth-estimation", model=str(tmp_path)),
            {"predicted_depth": torch.full((1, 8, 8), 2.0), "target_size": (8, 8)},
        )


def test_batch_of_eight_gives_the_same_depths_as_one_at_a_time(checkpoint, nyu_sample_dir):
    depth_estimator = pipeline("depth-estimation", model=str(checkpoint))
    paths = sorted(nyu_sample_dir.glob("*_colors.png"))[:7]
    images = [Image.open(p).convert("RGB") for p in paths] + [Image.open(paths[0]).resize((320, 256))]
    one_by_one = [depth_estimator(image)["metric_depth"] for image in images]
    batched = depth_estimator(images, batch_size=8)
    assert len(batched) == 8
    for single, together in zip(one_by_one, batched):
        assert single.shape == together["metric_depth"].shape
        np.testing.assert_allclose(together["metric_depth"], single, atol=1e-4)


def test_unreadable_image_path_fails_with_its_name(checkpoint, tmp_path):
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(ImageLoadError, match="broken.png"):
        pipeline("depth-estimation", model=str(checkpoint))(str(bad))


def test_saved_folder_carries_its_code(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert {"configuration_moa_depthclip.py", "modeling_moa_depthclip.py", "losses.py",
            "image_processing_moa_depthclip.py", "pipeline_moa_depthclip.py", "visualization.py"} <= files
    import json

    config = json.loads((checkpoint / "config.json").read_text())
    assert config["auto_map"]["AutoModelForDepthEstimation"] == "modeling_moa_depthclip.MoADepthCLIPForDepthEstimation"
    impl = config["custom_pipelines"]["depth-estimation"]["impl"]
    assert impl == "pipeline_moa_depthclip.MoADepthCLIPDepthEstimationPipeline"
    assert "pack_weights_for_cpu_inference" not in config  # no machine-specific switch in a saved model


def test_importing_the_package_leaves_other_depth_models_on_the_stock_pipeline(tmp_path, nyu_sample_dir):
    from transformers import DPTConfig, DPTForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    config = DPTConfig(
        hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=37, image_size=32, patch_size=16,
        neck_hidden_sizes=[16, 16, 16, 16], fusion_hidden_size=16, backbone_out_indices=[0, 1, 2, 3],
        reassemble_factors=[4, 2, 1, 0.5], head_hidden_size=8,
    )
    DPTForDepthEstimation(config).save_pretrained(tmp_path)
    DPTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    depth_estimator = pipeline("depth-estimation", model=str(tmp_path))
    assert type(depth_estimator) is DepthEstimationPipeline
    result = depth_estimator(Image.open(nyu_sample_dir / "00000_colors.png"))
    assert sorted(result) == ["depth", "predicted_depth"]  # the stock outputs, nothing added
    assert not any(type(m).__module__.startswith("modeling_moa_depthclip") for m in depth_estimator.model.modules())


def test_the_package_config_does_not_claim_a_remote_code_pipeline(checkpoint):
    # config.json names the pipeline for remote-code users; with the package imported, a custom task would make
    # transformers demand trust_remote_code=True for the registered pipeline
    from transformers import AutoConfig

    from modeling_moa_depthclip import MoADepthCLIPConfig

    config = AutoConfig.from_pretrained(checkpoint)
    assert type(config) is MoADepthCLIPConfig
    assert getattr(config, "custom_pipelines", {}) == {}
    assert "custom_pipelines" in config.to_dict()


def test_pipeline_runs_the_model_it_is_handed_unchanged(checkpoint):
    from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation

    model = MoADepthCLIPForDepthEstimation.from_pretrained(checkpoint).eval()
    modules = [(name, type(module)) for name, module in model.named_modules()]
    depth_estimator = pipeline("depth-estimation", model=model, image_processor=str(checkpoint))
    depth_estimator(Image.new("RGB", (96, 64), (40, 90, 200)))
    assert depth_estimator.model is model
    assert [(name, type(module)) for name, module in model.named_modules()] == modules


def test_trust_remote_code_in_a_fresh_process_without_the_package(checkpoint, nyu_sample_dir, tmp_path):
    script = textwrap.dedent(
        f"""
        import sys
        sys.modules["modeling_moa_depthclip"] = None  # the package cannot be imported in this process
        try:
            import modeling_moa_depthclip
            raise SystemExit("package still importable")
        except ImportError:
            pass
        import torch
        from transformers import AutoModelForDepthEstimation, pipeline
        model = AutoModelForDepthEstimation.from_pretrained({str(checkpoint)!r}, trust_remote_code=True)
        assert type(model).__name__ == "MoADepthCLIPForDepthEstimation", type(model)
        assert "transformers_modules" in type(model).__module__
        depth_estimator = pipeline("depth-estimation", model={str(checkpoint)!r}, trust_remote_code=True)
        assert type(depth_estimator).__name__ == "MoADepthCLIPDepthEstimationPipeline", type(depth_estimator)
        assert "transformers_modules" in type(depth_estimator).__module__
        result = depth_estimator({str(nyu_sample_dir / "00000_colors.png")!r})
        assert result["colored_depth"].mode == "RGB" and result["colored_depth"].size == (640, 480)
        torch.save(torch.from_numpy(result["metric_depth"]), {str(tmp_path / "remote.pt")!r})
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path,
                               timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    remote = torch.load(tmp_path / "remote.pt", weights_only=True)
    local = pipeline("depth-estimation", model=str(checkpoint))(str(nyu_sample_dir / "00000_colors.png"))
    assert remote.shape == (480, 640)
    assert torch.allclose(remote, local["predicted_depth"], atol=1e-5)
