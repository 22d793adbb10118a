import json
import logging
import subprocess
import sys
import textwrap
from functools import partial

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import DepthEstimationPipeline, pipeline

from modeling_moa_depthclip import ImageLoadError, MoADepthCLIPDepthEstimationPipeline
from tiny_models import save_tiny_checkpoint, tiny_model, tiny_processor

# the richer pipeline is asked for by name; importing the package does not install it
moa_pipeline = partial(pipeline, "depth-estimation", pipeline_class=MoADepthCLIPDepthEstimationPipeline)


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
        depth_estimator = moa_pipeline(model=str(checkpoint))
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
        result = moa_pipeline(model=str(tmp_path))(image)
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
    depth_estimator = moa_pipeline(model=str(checkpoint))
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
        moa_pipeline(model=str(checkpoint))(str(bad))


def test_saved_folder_carries_its_code(checkpoint):
    files = {p.name for p in checkpoint.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json"} <= files
    assert {"configuration_moa_depthclip.py", "modeling_moa_depthclip.py", "losses.py",
            "image_processing_moa_depthclip.py", "pipeline_moa_depthclip.py", "visualization.py",
            "loading.py", "utils.py", "configuration_depthclip.py"} <= files

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
    # transformers demand trust_remote_code=True instead of serving the task with its stock pipeline
    from transformers import AutoConfig

    from modeling_moa_depthclip import MoADepthCLIPConfig

    config = AutoConfig.from_pretrained(checkpoint)
    assert type(config) is MoADepthCLIPConfig
    assert getattr(config, "custom_pipelines", {}) == {}
    assert "custom_pipelines" in config.to_dict()


def test_importing_the_package_leaves_the_task_registry_as_it_was():
    script = textwrap.dedent(
        """
        import copy, logging
        from transformers.pipelines import PIPELINE_REGISTRY, SUPPORTED_TASKS
        before = copy.deepcopy(SUPPORTED_TASKS["depth-estimation"])
        tasks = sorted(PIPELINE_REGISTRY.get_supported_tasks())
        levels = {name: logging.getLogger(name).level for name in logging.root.manager.loggerDict}
        import modeling_moa_depthclip
        assert SUPPORTED_TASKS["depth-estimation"] == before, (SUPPORTED_TASKS["depth-estimation"], before)
        assert sorted(PIPELINE_REGISTRY.get_supported_tasks()) == tasks
        changed = [n for n, level in levels.items() if logging.getLogger(n).level != level]
        assert not changed, changed
        print("ok")
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0 and completed.stdout.strip() == "ok", completed.stderr[-3000:]


def test_the_stock_pipeline_serves_a_saved_model_as_it_serves_depth_anything(checkpoint, nyu_sample_dir):
    stock = pipeline("depth-estimation", model=str(checkpoint))
    assert type(stock) is DepthEstimationPipeline
    result = stock(Image.open(nyu_sample_dir / "00000_colors.png"))
    assert sorted(result) == ["depth", "predicted_depth"]
    assert result["depth"].mode == "L" and result["depth"].size == (640, 480)
    ours = moa_pipeline(model=str(checkpoint))(str(nyu_sample_dir / "00000_colors.png"))
    torch.testing.assert_close(result["predicted_depth"], ours["predicted_depth"])


def test_a_model_given_to_the_pipeline_is_run_as_it_is_never_changed():
    model = tiny_model()
    types = [type(m) for m in model.modules()]
    keys = list(model.state_dict())
    count = sum(p.numel() for p in model.parameters())
    image = Image.new("RGB", (96, 64), (40, 90, 200))
    for build in (moa_pipeline, partial(pipeline, "depth-estimation")):
        estimator = build(model=model, image_processor=tiny_processor(), device="cpu")
        assert estimator.model is model
        before = estimator(image)["predicted_depth"]
        assert [type(m) for m in model.modules()] == types and list(model.state_dict()) == keys
        assert sum(p.numel() for p in model.parameters()) == count
        # an in-place edit of a weight (as peft's merge does) reaches the next prediction
        with torch.no_grad():
            model.head.regressor.weight.data.mul_(3.0)
            model.head.fusion_gate.bias.data.add_(2.0)
        after = estimator(image)["predicted_depth"]
        assert (after - before).abs().max() > 1e-3


def test_the_package_pipeline_on_a_saved_folder_asks_nothing_about_remote_code(checkpoint):
    """Neither the package's pipeline nor the folder's own copy probes for a video processor (which would find the
    image processor's auto_map and ask whether to run remote code)."""
    script = textwrap.dedent(
        f"""
        import modeling_moa_depthclip
        from transformers import pipeline
        built = pipeline("depth-estimation", model={str(checkpoint)!r},
                         pipeline_class=modeling_moa_depthclip.MoADepthCLIPDepthEstimationPipeline)
        print(type(built).__name__)
        """
    )
    completed = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300,
                               stdin=subprocess.DEVNULL)  # fmt: skip
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip().splitlines()[-1] == "MoADepthCLIPDepthEstimationPipeline"
    assert "custom code" not in completed.stdout + completed.stderr


def test_the_cli_loader_packs_only_the_model_it_loaded_itself(checkpoint):
    from modeling_moa_depthclip.cli.predict import load_depth_pipeline
    from modeling_moa_depthclip.packed_linear import PackedLinear, onednn_linear_available

    packed = load_depth_pipeline(str(checkpoint), "cpu")
    plain = moa_pipeline(model=str(checkpoint), device="cpu")
    packed_layers = sum(isinstance(m, PackedLinear) for m in packed.model.modules())
    linears = sum(isinstance(m, torch.nn.Linear) for m in plain.model.modules())
    assert packed_layers == (linears if onednn_linear_available() else 0)
    assert not any(isinstance(m, PackedLinear) for m in plain.model.modules())
    image = Image.new("RGB", (96, 64), (40, 90, 200))
    np.testing.assert_allclose(packed(image)["metric_depth"], plain(image)["metric_depth"], rtol=1e-5, atol=1e-5)
    assert packed.model.state_dict().keys() == plain.model.state_dict().keys()


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


def test_the_readme_snippet_runs_as_written(checkpoint, nyu_sample_dir, tmp_path):
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Use it"):]
    snippet = section[section.index("```python") + len("```python"):section.index("```", section.index("```python") + 9)]
    assert 'model="outputs/train/best"' in snippet and "pipeline_class=MoADepthCLIPDepthEstimationPipeline" in snippet
    snippet = snippet.replace('"outputs/train/best"', repr(str(checkpoint)))
    snippet = snippet.replace('"../shared/data/nyu_eigen_test_sample/00000_colors.png"',
                              repr(str(nyu_sample_dir / "00000_colors.png")))
    check = "\nassert result['metric_depth'].shape == (480, 640) and result['colored_depth'].mode == 'RGB'\nprint('ok')\n"
    completed = subprocess.run([sys.executable, "-c", snippet + check], capture_output=True, text=True,
                               cwd=tmp_path, timeout=300)
    assert completed.returncode == 0 and completed.stdout.strip().endswith("ok"), completed.stderr[-3000:]
