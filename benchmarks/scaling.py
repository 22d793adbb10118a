"""Cost as the work grows: forward latency and peak memory of the default model against input size and batch, fp32
and bf16 in PyTorch, int8 in onnxruntime (batch 1). Used by `benchmarks/run.py` (section "scaling"); writes a plot.

Grid: input 224x224, 384x384, 480x640, 768x1024 and batch 1, 8, 32, leaving out what would take minutes per call on a
small CPU (`SKIPPED`). Peak memory is the resident-set high-water mark during one call (reset just before it) over
the resident set before it, measured in one process from the smallest to the largest work so that memory the
allocator keeps from a smaller call does not hide a larger one's.
"""

from __future__ import annotations

import contextlib
import io
import time

import numpy as np


SIZES = ((224, 224), (384, 384), (480, 640), (768, 1024))
BATCHES = (1, 8, 32)
# (height, width, batch) left out on CPU: tens of seconds to minutes per forward on 2 cores
SKIPPED = {(480, 640, 32), (768, 1024, 8), (768, 1024, 32)}
INT8_SIZES = ((224, 224), (480, 640))  # each size needs its own export (fixed input size)


def _rss():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _peak_rise(function):
    before = _rss()["VmRSS"]
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return float("nan")
    function()
    return _rss()["VmHWM"] - before


def bench_scaling(repeats: int = 2, scratch=None):
    import tempfile
    from pathlib import Path

    import torch

    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation, MoADepthCLIPImageProcessor
    from modeling_moa_depthclip.onnx_export import export_onnx
    from modeling_moa_depthclip.quantization import onnxruntime_session

    torch.manual_seed(0)
    fp32 = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig()).eval()
    bf16 = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig()).eval().to(torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    rows = []
    # from the least work to the most: memory the allocator keeps from a call then never hides a larger one's
    grid = sorted(((h, w, b) for h, w in SIZES for b in BATCHES if (h, w, b) not in SKIPPED),
                  key=lambda hwb: hwb[0] * hwb[1] * hwb[2])
    with torch.inference_mode():
        for height, width, batch in grid:
            x = torch.randn(batch, 3, height, width)
            for name, model, inputs in (("fp32", fp32, x), ("bf16", bf16, x.to(torch.bfloat16))):
                memory = _peak_rise(lambda: model(pixel_values=inputs))
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(pixel_values=inputs)
                    times.append(time.perf_counter() - start)
                rows.append({"precision": name, "size": f"{height}x{width}", "batch": batch,
                             "latency_ms": float(np.median(times)) * 1e3, "peak_rise": memory})
    scratch = Path(scratch or tempfile.mkdtemp(prefix="moa_scaling_"))
    for height, width in INT8_SIZES:
        processor = MoADepthCLIPImageProcessor(size={"height": height, "width": width})
        path = scratch / f"int8_{height}x{width}.onnx"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            export_onnx(fp32, processor, path, quantize="int8")
        session = onnxruntime_session(path)
        array = np.random.default_rng(0).standard_normal((1, 3, height, width)).astype(np.float32)
        memory = _peak_rise(lambda: session.run(None, {"pixel_values": array}))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            session.run(None, {"pixel_values": array})
            times.append(time.perf_counter() - start)
        rows.append({"precision": "int8", "size": f"{height}x{width}", "batch": 1,
                     "latency_ms": float(np.median(times)) * 1e3, "peak_rise": memory})
    return {"rows": rows, "skipped": sorted(f"{h}x{w} batch {b}" for h, w, b in SKIPPED)}


def plot_scaling(result, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (precision, batch), marker in zip(
        sorted({(r["precision"], r["batch"]) for r in result["rows"]}), "os^vD<>ph*"
    ):
        rows = sorted((r for r in result["rows"] if r["precision"] == precision and r["batch"] == batch),
                      key=lambda r: int(r["size"].split("x")[0]) * int(r["size"].split("x")[1]))
        pixels = [int(r["size"].split("x")[0]) * int(r["size"].split("x")[1]) for r in rows]
        label = f"{precision}, batch {batch}"
        axes[0].plot(pixels, [r["latency_ms"] / batch for r in rows], marker=marker, label=label)
        axes[1].plot(pixels, [r["peak_rise"] / 2**20 for r in rows], marker=marker, label=label)
    for axis, title in zip(axes, ("forward latency per image (ms)", "peak memory rise of one call (MiB)")):
        axis.set_xscale("log")
        axis.set_yscale("log")
        axis.set_xlabel("input pixels (224², 384², 480x640, 768x1024)")
        axis.set_title(title)
        axis.grid(True, which="both", alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def render_scaling(result, plot_name) -> list[str]:
    lines = [
        "## 10. Cost as the work grows (default configuration, CPU)",
        "",
        f"Run of {result.get('date', '?')}. Forward in inference mode; latency = median of repeated calls; peak "
        "memory = rise of the resident set's high-water mark during the first call over the resident set before "
        "it (weights already loaded). int8 = the onnxruntime int8 graph exported at that size, batch 1.",
        "",
        "| precision | input | batch | latency (ms) | per image (ms) | peak memory rise (MiB) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in result["rows"]:
        lines.append(f"| {r['precision']} | {r['size']} | {r['batch']} | {r['latency_ms']:.0f} | "
                     f"{r['latency_ms'] / r['batch']:.1f} | {r['peak_rise'] / 2**20:,.0f} |")
    lines += ["", "Left out on this CPU (minutes per call): " + ", ".join(result["skipped"]) + ".", "",
              f"![latency and memory against input size]({plot_name})"]
    return lines
