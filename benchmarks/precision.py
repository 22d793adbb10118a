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

    from modeling_moa_depthclip.onnx_export import export_onnx, quantize_onnx_int8

    from modeling_moa_depthclip.packed_linear import pack_linear_layers

    try:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_
    except ImportError:
        quantize_ = None

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

        packed = quantized = None
        if pack_linear_layers is not None:
            packed = copy.deepcopy(model)
            pack_linear_layers(packed)
            forward["packed"] = lambda: packed(pixel_values=pixel_values).predicted_depth

        bf16 = copy.deepcopy(model).to(torch.bfloat16)
        bf16_input = pixel_values.to(torch.bfloat16)
        forward["bf16"] = lambda: bf16(pixel_values=bf16_input).predicted_depth.float()

        if quantize_ is not None:
            start = time.perf_counter()
            quantized = copy.deepcopy(model)
            quantize_(quantized, Int8DynamicActivationInt8WeightConfig(set_inductor_config=False))
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

    from modeling_moa_depthclip.data import read_depth_image
    from modeling_moa_depthclip.quantization import load_depth_pipeline
    from modeling_moa_depthclip.evaluation.metrics import compute_depth_metrics

    colours = sorted(Path(frames_dir).glob("*_colors.png"))
    pipelines = {dtype: load_depth_pipeline(str(folder), dtype, "cpu") for dtype in ("float32", *dtypes)}
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
    means = {name: {"delta1": float(np.mean([m["d1"] for m in rows])),
                    "abs_rel": float(np.mean([m["abs_rel"] for m in rows]))} for name, rows in metrics.items()}
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

    from modeling_moa_depthclip.quantization import load_depth_pipeline

    first_call = {}
    pipelines = {}
    for dtype in dtypes:
        start = time.perf_counter()
        pipelines[dtype] = load_depth_pipeline(str(folder), dtype, "cpu")
        first_call[dtype] = time.perf_counter() - start
    results = {}
    with torch.inference_mode():
        for label, image in frames.items():
            functions = {dtype: (lambda p: lambda: p(image))(pipe) for dtype, pipe in pipelines.items()}
            results[label] = {k: v * 1e3 for k, v in interleaved_medians(functions, repeats, warmup=1).items()}
    return {"latency_ms": results, "load_s": first_call}


FLOOR_INT8_PIPELINE_RATIO = 0.5
FLOOR_INT8_P99_M = 0.01
FLOOR_INT8_DELTA1 = 0.005
PACKED_MARGIN = 0.10


# routes that give the fp32 depth (up to rounding): the ones that can replace an fp32 fast path without changing
# what users get; int8 and bf16 are faster but move the depth by about half a millimetre (opt-in choices)
FP32_ROUTES = ("eager", "compiled", "ort_fp32")


def _packed_verdict(sizes) -> list[str]:
    """Whether a maintained route that gives the fp32 depth comes within PACKED_MARGIN of `PackedLinear` at each
    input size (the rule that decides whether the hand-written fast path stays)."""
    lines = ["**The hand-written fast path.** `PackedLinear` against the maintained routes (x = latency over "
             "`PackedLinear`'s):", ""]
    beaten, kept = [], []
    for size, row in sizes.items():
        latency = row["latency_ms"]
        packed = latency["packed"]
        others = {k: v for k, v in latency.items() if k != "packed"}
        described = ", ".join(f"{CANDIDATES[k].split(' (')[0]} {v / packed:.2f}x" for k, v in
                              sorted(others.items(), key=lambda kv: kv[1]))
        lines.append(f"- {size}: `PackedLinear` {packed:.1f} ms; {described}.")
        close = [(latency[k] / packed, k) for k in FP32_ROUTES if k in latency and latency[k] <= packed * (1 + PACKED_MARGIN)]
        (beaten if close else kept).append((size, close))
    verdict = []
    if kept:
        verdict.append(
            f"In fp32, no maintained route comes within 10% of it at {', '.join(size for size, _ in kept)}, so "
            "`PackedLinear` stays the fp32 CPU path that the command line, the demo and "
            "`quantization.load_depth_pipeline` install on the model they load (never on a model handed to the "
            "pipeline)."
        )
    if beaten:
        verdict.append("At " + "; ".join(
            f"{size} " + ", ".join(f"{CANDIDATES[k].split(' (')[0]} {r:.2f}x" for r, k in close)
            for size, close in beaten) + " comes within 10% of it.")  # fmt: skip
    verdict.append("int8 and bf16 are faster still, at the price of about half a millimetre of depth: the opt-in "
                   "`--dtype int8` / `--dtype bfloat16`.")
    return lines + ["", " ".join(verdict), ""]


def render_precision(result) -> list[str]:
    machine = result["machine"]
    candidates = result["candidates"]
    lines = [
        "## 7. Low precision and the CPU fast path (default configuration, batch 1, CPU)",
        "",
        f"Run of {machine['date']} ({machine['cpu']}, {machine['cores']} cores, torch threads {machine['threads']}; "
        f"1-minute load average {machine['load']:.2f} at the start: the machine is shared, so only ratios within "
        f"one table count). Model forward on one input, candidates interleaved round-robin, median of "
        f"{result['repeats']}; first call = the first output after the model is in memory, including what the "
        "candidate needs first (inductor's compilation, the ONNX export and quantisation).",
        "",
    ]
    for size, row in candidates["sizes"].items():
        latency, eager = row["latency_ms"], row["latency_ms"]["eager"]
        lines += [
            f"### model input {size}",
            "",
            "| candidate | latency (ms) | x eager fp32 | first call (s) | max abs depth difference from eager fp32 (m) |",
            "| --- | --- | --- | --- | --- |",
        ]
        for name, value in sorted(latency.items(), key=lambda kv: kv[1]):
            lines.append(
                f"| {CANDIDATES[name]} | {value:.1f} | {value / eager:.2f} | {row['first_call_s'][name]:.1f} | "
                f"{row['max_diff_m'][name]:.1e} |"
            )
        lines.append("")
    if any("packed" in row["latency_ms"] for row in candidates["sizes"].values()):
        lines += _packed_verdict(candidates["sizes"])
    first = candidates["sizes"][next(iter(candidates["sizes"]))]["first_call_s"]
    lines += [
        "**The default CPU path**: the pipeline runs the model a caller hands over unchanged (plain PyTorch, eager "
        "fp32); the command line and the demo add `PackedLinear` to the model they load (same depth up to fp32 "
        "rounding, no first-call cost worth naming). inductor with freezing needs "
        + (f"{first['compiled']:.0f} s" if "compiled" in first else "tens of seconds")
        + f" and the ONNX export {first['ort_fp32']:.0f} s before their first output, which a CLI call or a demo "
        "start pays every time. The fastest route, onnxruntime's int8, is the opt-in `--dtype int8` / "
        "`dtype=\"int8\"`: its depth differs from fp32 (by millimetres, below) and its export is made once and "
        "cached.",
        "",
    ]
    pipelines = result["pipelines"]
    lines += [
        "### int8 through the pipeline",
        "",
        "`modeling_moa_depthclip.quantization.load_depth_pipeline(folder, dtype)` (what `moa-depthclip predict "
        "--dtype` and the demo's `--dtype` use): PIL image in, depth at the image's size and the two depth pictures "
        "out, batch 1, interleaved. int8 = onnxruntime's dynamic int8 quantisation of the ONNX export, made once "
        "and cached (the load time below includes it; later loads read the cache).",
        "",
        "| image | " + " | ".join(f"{d} (ms)" for d in next(iter(pipelines["latency_ms"].values()))) + " | int8 / float32 |",
        "| --- | " + " | ".join("---" for _ in next(iter(pipelines["latency_ms"].values()))) + " | --- |",
    ]
    for label, row in pipelines["latency_ms"].items():
        lines.append(f"| {label} | " + " | ".join(f"{v:.1f}" for v in row.values())
                     + f" | {row['int8'] / row['float32']:.2f} |")
    lines += ["", "Load time (first use, s): " + ", ".join(
        f"{d} {v:.1f}" for d, v in pipelines["load_s"].items()) + "."]
    if any("packed" in row["latency_ms"] for row in candidates["sizes"].values()):
        lines += ["", "The float32 pipeline of this run ran `PackedLinear` (the CPU path of the command line and the "
                  "demo), the faster fp32 reference for the int8 ratio."]
    accuracy = result["accuracy"]
    lines += ["", "### int8 and bf16 against fp32 on the NYU frames", ""]
    if "missing" in accuracy:
        lines.append(accuracy["missing"])
    else:
        metrics = accuracy["metrics"]
        lines += [
            (f"Separate run of {accuracy['date']}. " if accuracy.get("date") else "")
            + f"Trained model: {accuracy['model']}; the {accuracy['frames']} shared NYU frames; depth through each "
            "pipeline at image size, compared with fp32 on the pixels with valid ground truth; delta1 and AbsRel "
            "against the ground truth (Eigen crop, mean over frames).",
            "",
            "| precision | mean abs difference (mm) | 99th percentile (mm) | largest (mm) | delta1 | change | AbsRel |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| float32 | - | - | - | {metrics['float32']['delta1']:.4f} | - | {metrics['float32']['abs_rel']:.4f} |",
        ]
        for dtype, diff in accuracy["difference_m"].items():
            lines.append(
                f"| {dtype} | {diff['mean'] * 1e3:.2f} | {diff['p99'] * 1e3:.2f} | {diff['max'] * 1e3:.2f} | "
                f"{metrics[dtype]['delta1']:.4f} | {metrics[dtype]['delta1'] - metrics['float32']['delta1']:+.4f} | "
                f"{metrics[dtype]['abs_rel']:.4f} |"
            )
    lines += ["", "| floor (int8) | measured | holds |", "| --- | --- | --- |"]
    ratio = pipelines["latency_ms"]["640x480 image"]["int8"] / pipelines["latency_ms"]["640x480 image"]["float32"]
    lines.append(f"| end-to-end pipeline time <= {FLOOR_INT8_PIPELINE_RATIO}x fp32 (640x480 image) | {ratio:.2f}x | "
                 f"{'yes' if ratio <= FLOOR_INT8_PIPELINE_RATIO else '**no**'} |")
    if "missing" not in accuracy:
        p99 = accuracy["difference_m"]["int8"]["p99"]
        delta = abs(accuracy["metrics"]["int8"]["delta1"] - accuracy["metrics"]["float32"]["delta1"])
        lines.append(f"| depth difference from fp32, 99th percentile <= {FLOOR_INT8_P99_M * 100:g} cm | "
                     f"{p99 * 1e3:.2f} mm | {'yes' if p99 <= FLOOR_INT8_P99_M else '**no**'} |")
        lines.append(f"| delta1 change <= {FLOOR_INT8_DELTA1} | {delta:.4f} | "
                     f"{'yes' if delta <= FLOOR_INT8_DELTA1 else '**no**'} |")
    return lines
