"""int8 inference: torchao's dynamic quantisation through the loader, the CLI and the demo's parser, and
onnxruntime's dynamic int8 quantisation of the exported ONNX file."""

import numpy as np
import pytest
import torch
from PIL import Image

for _module in ("onnx", "onnxruntime", "onnxscript"):
    pytest.importorskip(_module, reason=f"{_module} is not installed (pip install 'moa-depthclip[onnx]')")

from modeling_moa_depthclip.cli.predict import DTYPES, main  # noqa: E402
from modeling_moa_depthclip.quantization import (  # noqa: E402
    CACHE_ENV,
    INFERENCE_DTYPES,
    OnnxRuntimeDepthEstimationPipeline,
    int8_onnx_file,
    load_depth_pipeline,
    torch_dtype_for,
)
from tiny_models import tiny_model, tiny_processor  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning", "ignore::UserWarning")


@pytest.fixture(autouse=True)
def cache(tmp_path_factory, monkeypatch):
    folder = tmp_path_factory.getbasetemp() / "int8_cache"
    monkeypatch.setenv(CACHE_ENV, str(folder))
    return folder / "onnx"


def test_int8_pipeline_runs_onnxruntime_and_stays_close_to_fp32(checkpoint, nyu_sample_dir, cache):
    fp32 = load_depth_pipeline(str(checkpoint), dtype="float32", device="cpu")
    int8 = load_depth_pipeline(str(checkpoint), dtype="int8")
    assert type(fp32) is not OnnxRuntimeDepthEstimationPipeline and isinstance(int8, OnnxRuntimeDepthEstimationPipeline)
    (onnx_file,) = cache.glob("*-int8.onnx")
    images = [Image.open(nyu_sample_dir / f"{frame}_colors.png") for frame in ("00000", "00008", "00014")]
    expected = [result["metric_depth"] for result in fp32(images)]
    got = [result["metric_depth"] for result in int8(images, batch_size=2)]
    for depth, reference in zip(got, expected):
        assert depth.shape == reference.shape == (480, 640) and depth.dtype == np.float32
        assert not np.array_equal(depth, reference)  # really ran quantised
        np.testing.assert_allclose(depth, reference, atol=0.05 * float(np.abs(reference).max()))
    result, reference = int8(images[0]), fp32(images[0])
    # the same outputs as fp32, the uncertainty of the depth bins included (the graph's second output)
    assert sorted(result) == sorted(reference) == [
        "colored_depth", "colored_uncertainty", "depth", "metric_depth", "predicted_depth", "uncertainty"
    ]
    np.testing.assert_allclose(result["uncertainty"], reference["uncertainty"],
                               atol=0.05 * float(np.abs(reference["uncertainty"]).max()))  # fmt: skip
    # a second load reads the cached file instead of exporting again
    stamp = onnx_file.stat().st_mtime_ns
    load_depth_pipeline(str(checkpoint), dtype="int8")
    assert onnx_file.stat().st_mtime_ns == stamp and len(list(cache.glob("*.onnx"))) == 1


def test_the_cache_key_follows_the_weights_and_leaves_the_model_alone(cache):
    model, processor = tiny_model(), tiny_processor()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    first = int8_onnx_file(model, processor)
    assert int8_onnx_file(model, processor) == first
    other = int8_onnx_file(tiny_model(seed=1), processor)
    assert other != first and other.is_file()
    after = model.state_dict()
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())


def test_int8_is_a_cpu_path(checkpoint):
    with pytest.raises(ValueError, match="int8 runs on the CPU"):
        load_depth_pipeline(str(checkpoint), dtype="int8", device="cuda")


def test_one_list_of_dtypes_and_a_clear_error():
    assert DTYPES == INFERENCE_DTYPES and "int8" in DTYPES
    assert torch_dtype_for("int8") is torch.float32 and torch_dtype_for("bfloat16") is torch.bfloat16
    with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16, float16, int8, got 'int4'"):
        torch_dtype_for("int4")


def test_cli_int8(checkpoint, nyu_sample_dir, tmp_path):
    image = nyu_sample_dir / "00000_colors.png"
    assert main(["predict", str(image), "--model", str(checkpoint), "--output-dir", str(tmp_path / "fp32")]) == 0
    assert main(["predict", str(image), "--model", str(checkpoint), "--output-dir", str(tmp_path / "int8"),
                 "--dtype", "int8"]) == 0
    fp32 = np.load(tmp_path / "fp32" / "00000_colors_depth.npy")
    int8 = np.load(tmp_path / "int8" / "00000_colors_depth.npy")
    assert int8.shape == fp32.shape == (480, 640) and int8.dtype == np.float32
    assert not np.array_equal(int8, fp32)
    np.testing.assert_allclose(int8, fp32, atol=0.05 * float(np.abs(fp32).max()))


def test_cli_rejects_an_unknown_dtype(capsys, tmp_path):
    with pytest.raises(SystemExit):
        main(["predict", "x.png", "--model", "m", "--output-dir", str(tmp_path), "--dtype", "int4"])
    assert "--dtype" in capsys.readouterr().err


def test_demo_takes_the_dtype():
    pytest.importorskip("gradio")
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("demo_app", Path(__file__).resolve().parents[1] / "demo" / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    assert app.build_parser().parse_args(["--model", "m", "--dtype", "int8"]).dtype == "int8"


# ---------------------------------------------------------------- the exported file


@pytest.fixture(scope="module")
def exported_int8(checkpoint, tmp_path_factory):
    from conversion import export_onnx as exporter

    model, processor = exporter.load_model_and_processor(checkpoint)
    folder = tmp_path_factory.mktemp("onnx_int8")
    fp32 = exporter.export_onnx(model, processor, folder / "model.onnx")
    int8 = exporter.quantize_onnx_int8(fp32, folder / "model-int8.onnx")
    return model, processor, fp32, int8


def test_onnx_int8_graph_is_quantised_and_close(exported_int8, nyu_sample_dir):
    import onnx

    from conversion.onnx_inference import OnnxDepthEstimator

    model, processor, fp32, int8 = exported_int8
    graph = onnx.load(str(int8)).graph
    ops = {node.op_type for node in graph.node}
    assert ops & {"DynamicQuantizeLinear", "MatMulInteger", "DynamicQuantizeMatMul"}, ops
    assert any(init.data_type == onnx.TensorProto.INT8 for init in graph.initializer)
    assert int8.stat().st_size < fp32.stat().st_size
    image = Image.open(nyu_sample_dir / "00000_colors.png")
    # the preprocessing metadata survives quantisation: the .onnx file alone still runs
    depth_int8 = OnnxDepthEstimator(int8)(image)
    depth_fp32 = OnnxDepthEstimator(fp32)(image)
    assert depth_int8.shape == (480, 640)
    assert not np.array_equal(depth_int8, depth_fp32)
    np.testing.assert_allclose(depth_int8, depth_fp32, atol=0.05 * float(np.abs(depth_fp32).max()))


def test_export_script_quantize_int8(checkpoint, nyu_sample_dir, tmp_path, capsys):
    from conversion import export_onnx as exporter

    output = tmp_path / "model-int8.onnx"
    assert exporter.main(["--model", str(checkpoint), "--output", str(output), "--quantize", "int8",
                          "--images", str(nyu_sample_dir), "--num-images", "2"]) == 0
    printed = capsys.readouterr().out
    assert "int8" in printed and "tolerance 0.01 m" in printed
    with pytest.raises(SystemExit):
        exporter.main(["--model", str(checkpoint), "--output", str(output), "--quantize", "int4"])


def test_the_torch_free_reader_uses_the_exporters_metadata_key():
    from conversion.onnx_inference import PREPROCESSING_METADATA_KEY as reader_key
    from modeling_moa_depthclip.onnx_export import PREPROCESSING_METADATA_KEY

    assert reader_key == PREPROCESSING_METADATA_KEY
