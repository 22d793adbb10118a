"""ONNX export: checker, onnxruntime against PyTorch at two batch sizes, the torch-free path, the script's errors."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install 'moa-depthclip[onnx]')")

import onnx  # noqa: E402
import onnxruntime  # noqa: E402

REPO_ROOT = Path(__file__).resolve().parents[1]

from conversion import export_onnx as exporter  # noqa: E402
from conversion.onnx_inference import OnnxDepthEstimator, resize_bilinear  # noqa: E402
from tiny_models import tiny_model, tiny_processor  # noqa: E402

from modeling_moa_depthclip import load_image_file  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

TOLERANCE_M = 1e-3


def adapted_tiny_model(adapter_scale=0.5):
    """The tiny model with its zero-initialised adapter up-projections drawn large enough that adapters matter,
    and a head whose depth spans metres rather than the near-constant depth of its small initialisation."""
    model = tiny_model()
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "experts.up_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * adapter_scale)
            elif name.startswith("head.") and name.endswith(".weight"):
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.5)
    return model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_checkpoint")
    adapted_tiny_model().save_pretrained(folder)
    tiny_processor().save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    model, processor = exporter.load_model_and_processor(checkpoint)
    path = exporter.export_onnx(model, processor, tmp_path_factory.mktemp("onnx") / "model.onnx")
    return model, processor, path


@pytest.fixture(scope="module")
def frames(nyu_sample_dir):
    return [load_image_file(path) for path in sorted(nyu_sample_dir.glob("*_colors.png"))[:3]]


def test_adapters_change_the_output():
    """The tiny model's adapters are not the identity, so the export is checked on a graph where they matter."""
    model = adapted_tiny_model()
    plain = adapted_tiny_model(adapter_scale=0.0)
    with torch.no_grad():
        pixel_values = torch.randn(1, 3, 64, 64)
        difference = (model(pixel_values).predicted_depth - plain(pixel_values).predicted_depth).abs().max()
    assert difference > 0.05


def test_export_passes_checker_with_dynamic_batch(exported):
    _, _, path = exported
    onnx.checker.check_model(str(path), full_check=True)
    graph = onnx.load(str(path)).graph
    (pixel_values,) = graph.input
    assert pixel_values.name == "pixel_values"
    batch_dim = pixel_values.type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert [d.dim_value for d in pixel_values.type.tensor_type.shape.dim[1:]] == [3, 64, 64]
    assert [output.name for output in graph.output] == ["predicted_depth", "depth_uncertainty"]
    assert exporter.onnx_opset(path) == exporter.DEFAULT_OPSET


@pytest.mark.parametrize("batch_size", [1, 3])
def test_onnxruntime_matches_pytorch(exported, batch_size):
    model, _, path = exported
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    pixel_values = torch.randn(batch_size, 3, 64, 64, generator=torch.Generator().manual_seed(batch_size))
    with torch.no_grad():
        reference = model(pixel_values=pixel_values)
    depth, uncertainty = session.run(None, {"pixel_values": pixel_values.numpy()})
    assert depth.shape == uncertainty.shape == (batch_size, 64, 64)
    assert np.abs(depth - reference.predicted_depth.numpy()).max() <= TOLERANCE_M
    assert np.abs(uncertainty - reference.depth_uncertainty.numpy()).max() <= TOLERANCE_M


def test_compare_on_real_frames(exported, frames):
    model, processor, path = exported
    differences = exporter.compare_with_pytorch(model, processor, path, frames)
    assert set(differences) == {
        "batch 1", f"batch {len(frames)}", "torch-free path at image size",
        "batch 1 depth_uncertainty", f"batch {len(frames)} depth_uncertainty",
        "torch-free path at image size uncertainty",
    }  # fmt: skip
    assert max(differences.values()) <= TOLERANCE_M


def test_torch_free_path_gives_pipeline_depth(exported, checkpoint, nyu_sample_dir, tmp_path):
    """The no-torch path, run where importing torch fails, gives the depth-estimation pipeline's depth."""
    from transformers import pipeline

    _, _, path = exported
    image = sorted(nyu_sample_dir.glob("*_colors.png"))[0]
    result = tmp_path / "depth.npy"
    script = (
        "import sys; sys.modules['torch'] = None\n"  # any import of torch now raises ImportError
        f"sys.path.insert(0, {str(REPO_ROOT)!r})\n"
        "import numpy as np\n"
        "from conversion.onnx_inference import OnnxDepthEstimator\n"
        f"np.save({str(result)!r}, OnnxDepthEstimator({str(path)!r})({str(image)!r}))\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, cwd=tmp_path)
    depth = np.load(result)

    expected = pipeline("depth-estimation", model=str(checkpoint), device="cpu")(str(image))["predicted_depth"].numpy()
    assert depth.shape == expected.shape == (480, 640)
    assert np.abs(depth - expected).max() <= TOLERANCE_M


def test_torch_free_preprocessing_matches_processor(exported, frames):
    _, processor, path = exported
    estimator = OnnxDepthEstimator(path)
    rgba = frames[0].convert("RGBA")
    rgba.putalpha(128)
    images = [frames[0], frames[1].convert("L"), rgba]
    expected = processor(images=images, return_tensors="np")["pixel_values"]
    np.testing.assert_allclose(estimator.preprocess(images), expected, atol=1e-4)


def test_resize_bilinear_matches_torch():
    array = np.random.default_rng(0).random((2, 7, 9)).astype(np.float32)
    for size in [(480, 640), (5, 4), (7, 9)]:
        expected = torch.nn.functional.interpolate(torch.from_numpy(array)[None], size=size, mode="bilinear")[0]
        np.testing.assert_allclose(resize_bilinear(array, *size), expected.numpy(), atol=1e-6)


def test_script_end_to_end(checkpoint, nyu_sample_dir, tmp_path, capsys):
    output = tmp_path / "model.onnx"
    code = exporter.main(
        ["--model", str(checkpoint), "--output", str(output), "--images", str(nyu_sample_dir), "--num-images", "2"]
    )
    printed = capsys.readouterr().out
    assert code == 0
    assert output.is_file()
    assert f"ONNX opset {exporter.DEFAULT_OPSET}" in printed
    assert "max |onnxruntime - PyTorch| on 2 frames" in printed


def test_script_refuses_existing_output(checkpoint, tmp_path, capsys):
    output = tmp_path / "model.onnx"
    output.write_bytes(b"keep me")
    assert exporter.main(["--model", str(checkpoint), "--output", str(output)]) == 2
    assert "exists; pass --overwrite" in capsys.readouterr().err
    assert output.read_bytes() == b"keep me"


def test_script_reports_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "no_such_model"
    assert exporter.main(["--model", str(missing), "--output", str(tmp_path / "model.onnx")]) == 2
    assert f"model folder {missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "model.onnx").exists()


def test_script_reports_folder_without_config(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert exporter.main(["--model", str(tmp_path / "empty"), "--output", str(tmp_path / "model.onnx")]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_help_states_opset():
    completed = subprocess.run(
        [sys.executable, "-m", "conversion.export_onnx", "--help"],
        capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"}, cwd=REPO_ROOT,
    )
    assert f"opset {exporter.DEFAULT_OPSET}" in completed.stdout


def test_estimator_can_turn_thread_spinning_off(exported):
    _, _, path = exported
    entry = "session.intra_op.allow_spinning"
    quiet = OnnxDepthEstimator(path, intra_op_num_threads=2, allow_spinning=False).session.get_session_options()
    assert quiet.get_session_config_entry(entry) == "0" and quiet.intra_op_num_threads == 2
    default = OnnxDepthEstimator(path).session.get_session_options()
    with pytest.raises(Exception, match="allow_spinning"):  # unset: onnxruntime's default (spinning) applies
        default.get_session_config_entry(entry)
