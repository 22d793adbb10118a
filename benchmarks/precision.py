"""Low precision and the CPU fast path: the candidates side by side, the int8 pipeline end to end, int8 accuracy.

Used by `benchmarks/run.py` (section "precision"); every figure of one call comes from one process, candidates
interleaved round-robin so that load from other processes falls on all of them alike.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import tempfile
import time
from pathlib import Path

import numpy as np


# candidate -> description in the report
CANDIDATES = {
    "eager": "eager fp32 (`nn.Linear`, MKL sgemm)",
    "packed": "`PackedLinear` (hand-written: oneDNN on weights packed once)",
    "compiled": "`torch.compile(options={\"freezing\": True})` (inductor, fp32)",
    "bf16": "bf16 weights and activations (eager)",
    "ort_fp32": "onnxruntime fp32 on the project's ONNX export",
    "ort_int8": "onnxruntime dynamic int8 (`quantize_dynamic`, per channel)",
    "torchao_int8": "torchao int8 dynamic activation + int8 weight (eager)",
}


def _timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_medians(functions, repeats, warmup=1):
    for function in functions.values():
        for _ in range(warmup):
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(_timed(function))
    return {name: float(np.median(values)) for name, values in times.items()}


def _ort_session(path, threads):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    # idle onnxruntime threads would busy-wait and slow the PyTorch candidates interleaved with them
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def bench_candidates(model, processor, repeats, *, sizes=((224, 224),), compile_model=True, scratch=None):
    """Batch-1 forward of every candidate at each model input size `(height, width)`: median latency, the first
    call (with what it needs first: compiling, exporting, quantising), and the largest depth difference from eager
    fp32 on the same input."""
    import torch

    from conversion.export_onnx import export_onnx, quantize_onnx_int8
    from modeling_moa_depthclip import pack_linear_layers
    from modeling_moa_depthclip.quantization import quantize_int8

    threads = torch.get_num_threads()
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)
    scratch = Path(scratch or tempfile.mkdtemp(prefix="moa_precision_"))
    results = {"threads": threads, "sizes": {}}
    model = model.eval()
    for height, width in sizes:
        pixel_values = torch.randn(1, 3, height, width, generator=torch.Generator().manual_seed(0))
        array = pixel_values.numpy()
        setup_s, first_s, forward = {}, {}, {}
        forward["eager"] = lambda: model(pixel_values=pixel_values).predicted_depth

        start = time.perf_counter()
        packed = pack_linear_layers(copy.deepcopy(model))
        setup_s["packed"] = time.perf_counter() - start
        forward["packed"] = lambda: packed(pixel_values=pixel_values).predicted_depth

        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        bf16_input = pixel_values.to(torch.bfloat16)
        forward["bf16"] = lambda: bf16(pixel_values=bf16_input).predicted_depth.float()

        start = time.perf_counter()
        quantized = quantize_int8(copy.deepcopy(model))
        setup_s["torchao_int8"] = time.perf_counter() - start
        forward["torchao_int8"] = lambda: quantized(pixel_values=pixel_values).predicted_depth

        processor_at_size = copy.deepcopy(processor)
        processor_at_size.size = {"height": height, "width": width}
        onnx_path = scratch / f"model_{height}x{width}.onnx"
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            export_onnx(model, processor_at_size, onnx_path)
        setup_s["ort_fp32"] = time.perf_counter() - start
        start = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            quantize_onnx_int8(onnx_path, scratch / f"model_{height}x{width}_int8.onnx")
        setup_s["ort_int8"] = setup_s["ort_fp32"] + time.perf_counter() - start
        sessions = {
            "ort_fp32": _ort_session(onnx_path, threads),
            "ort_int8": _ort_session(scratch / f"model_{height}x{width}_int8.onnx", threads),
        }
        for name, session in sessions.items():
            forward[name] = (lambda s: lambda: torch.from_numpy(s.run(None, {"pixel_values": array})[0]))(session)

        with torch.inference_mode():
            if compile_model:
                compiled = torch.compile(copy.deepcopy(model), options={"freezing": True})
                forward["compiled"] = lambda: compiled(pixel_values=pixel_values).predicted_depth
            reference = forward["eager"]()
            difference = {}
            for name, function in forward.items():
                first_s[name] = _timed(function) + setup_s.get(name, 0.0)
                difference[name] = float((function() - reference).abs().max())
            latency = interleaved_medians(forward, repeats, warmup=1)
        results["sizes"][f"{height}x{width}"] = {
            "latency_ms": {name: value * 1e3 for name, value in latency.items()},
            "first_call_s": first_s,
            "max_diff_m": difference,
        }
        del packed, bf16, quantized, sessions
    return results


def nyu_accuracy(folder, frames_dir, dtypes=("bfloat16", "int8")):
    """Depth of each low precision against fp32 on real frames with a trained model: |difference| percentiles
    (metres, at image size, valid ground-truth pixels) and the change in delta1 and AbsRel (Eigen crop)."""
    import torch

    from modeling_moa_depthclip.cli.predict import load_depth_pipeline
    from modeling_moa_depthclip.data import read_depth_image
    from modeling_moa_depthclip.evaluation.metrics import compute_depth_metrics

    colours = sorted(Path(frames_dir).glob("*_colors.png"))
    pipelines = {"float32": load_depth_pipeline(str(folder), "cpu", "float32")}
    for dtype in dtypes:
        pipelines[dtype] = load_depth_pipeline(str(folder), "cpu", dtype)
    config = pipelines["float32"].model.config
    differences = {dtype: [] for dtype in dtypes}
    metrics = {name: [] for name in pipelines}
    for colour in colours:
        depth_path = colour.with_name(colour.name.replace("_colors", "_depth"))
        gt = np.asarray(read_depth_image(depth_path), dtype=np.float32)
        valid = (gt > config.min_depth) & (gt <= config.max_depth)
        with torch.inference_mode():
            depths = {name: pipe(str(colour))["metric_depth"] for name, pipe in pipelines.items()}
        for name, depth in depths.items():
            metrics[name].append(compute_depth_metrics(depth, gt, config.min_depth, config.max_depth))
        for dtype in dtypes:
            differences[dtype].append(np.abs(depths[dtype] - depths["float32"])[valid])
    means = {name: {key: float(np.mean([m[key] for m in rows])) for key in ("delta1", "abs_rel")}
             for name, rows in metrics.items()}
    result = {"frames": len(colours), "metrics": means, "difference_m": {}}
    for dtype in dtypes:
        values = np.concatenate(differences[dtype])
        result["difference_m"][dtype] = {
            "mean": float(values.mean()), "p99": float(np.percentile(values, 99)), "max": float(values.max()),
        }
    return result


def bench_pipelines(folder, frames, repeats, dtypes=("float32", "int8")):
    """End to end (PIL image in, depth out) through `load_depth_pipeline(folder, dtype=...)`, batch 1, for each
    image in `frames` (one per input size), interleaved."""
    import torch

    from modeling_moa_depthclip.cli.predict import load_depth_pipeline

    pipelines = {dtype: load_depth_pipeline(str(folder), "cpu", dtype) for dtype in dtypes}
    results = {}
    with torch.inference_mode():
        for label, image in frames.items():
            functions = {dtype: (lambda p: lambda: p(image))(pipe) for dtype, pipe in pipelines.items()}
            results[label] = {k: v * 1e3 for k, v in interleaved_medians(functions, repeats, warmup=1).items()}
    return results
