"""Speed, memory and parameter efficiency of MoA-DepthCLIP against the models users would pick instead.

    python benchmarks/run.py            # full run (half an hour on 2 shared CPU cores); writes BENCHMARKS.md
    python benchmarks/run.py --quick    # fewer repetitions
    python benchmarks/run.py --no-write # print only
    python benchmarks/run.py --sections precision gpu   # only these sections (the others keep their last figures)
    python benchmarks/run.py --device cuda               # the GPU section on a machine with one
    python benchmarks/run.py --render-only               # BENCHMARKS.md from the kept figures

Every section is measured in one run, on this machine, with randomly initialised weights (speed and memory do not
depend on the weight values; no model hub is reachable here):

1. end to end: a 640x480 PIL image in, depth at 640x480 out, through each model's own
   `pipeline("depth-estimation", model=folder)` (model and image processor saved with `save_pretrained`): this
   project's default and "paper" configurations against Depth Anything V2 Small (metric, indoor head) and DPT-Hybrid
   (Intel/dpt-hybrid-midas). Batch-1 latency (median after warm-up) and batch-8 throughput, models interleaved
   round-robin so that load from other processes falls on all of them alike;
2. where the time of this project's pipeline goes: preprocessing, model forward, postprocessing;
3. the model forward's achieved FLOP/s (FLOPs of the executed graph from `torch.utils.flop_counter.FlopCounterMode`)
   against a large fp32 matmul timed interleaved with it;
4. training cost: parameters, time per AdamW step and peak memory (each configuration in its own subprocess); 4b
   (`benchmarks/training_profile.py`, section "training"): data, forward, backward and optimiser per setting;
5. peak memory (RSS) of inference, each model in its own subprocess;
6. onnxruntime latency of the exported model (conversion/export_onnx.py);
7. low precision and the CPU fast path (`benchmarks/precision.py`): eager fp32, bf16, inductor with freezing,
   onnxruntime fp32 and its dynamic int8 quantisation (and torchao's int8 where installed), the int8 pipeline end
   to end against fp32, and int8's depth against fp32 on the NYU frames with a trained model (`--model-dir`);
8. data (`benchmarks/data_loading.py`): frames/s of one loader worker per source kind, today's path and the
   training view at the model input size;
9. the GPU path (`benchmarks/gpu.py`, `--device cuda`): inference throughput and bf16 training with the data loader;
10. scaling (`benchmarks/scaling.py`): latency and peak memory against input size and batch, fp32 / bf16 / int8.

Each section's figures are kept in benchmarks/results/SECTION.json with the run's date and machine, so that
`--sections` reruns some of them and BENCHMARKS.md is rendered from all; the report says which run each came from.

Peak memory is the kernel's resident-set high-water mark (`VmHWM` of /proc/self/status), reset with
/proc/self/clear_refs just before the measured work, reported as the absolute peak and as the rise over the resident
set just before that work (weights already loaded). BENCHMARKS.md is generated from the figures: do not edit it by hand.
"""

from __future__ import annotations

import argparse
import copy
import contextlib
import datetime
import io
import json
import logging
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# Before torch loads OpenMP: idle OpenMP threads sleep instead of spinning, so that on a shared machine the PyTorch
# candidates are not slowed by their own spinning threads more than onnxruntime (run without spinning) is
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402


REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(1, str(REPO_ROOT / "examples"))
from sample_data import NYU_SAMPLE_DIR as DEFAULT_FRAMES  # noqa: E402  the scripts' one choice of the NYU frames
IMAGE_SIZE = (640, 480)
TRAIN_BATCH, TRAIN_SIZE = 8, 224
MATMUL_N = 2048
THROUGHPUT_BATCH = 8

OURS_DEFAULT = "MoA-DepthCLIP default"
OURS_PAPER = "MoA-DepthCLIP paper"
DEPTH_ANYTHING = "Depth Anything V2 Small"
DPT_HYBRID = "DPT-Hybrid"
MODELS = (OURS_DEFAULT, OURS_PAPER, DEPTH_ANYTHING, DPT_HYBRID)

# Floors the project holds itself to (checked here, not in the tests)
FLOOR_SPEEDUP_VS_DEPTH_ANYTHING = 10.0
FLOOR_PRE_POST_SHARE = 0.15
FLOOR_MATMUL_FRACTION = 0.50
FLOOR_TRAIN_MEMORY_RATIO = 0.5


# --------------------------------------------------------------------------------------------------------------------
# models


def build_model_and_processor(name):
    """A randomly initialised model of `name` and its image processor with the published preprocessing settings."""
    import torch
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, DPTConfig, DPTForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation, MoADepthCLIPImageProcessor

    torch.manual_seed(0)
    if name == OURS_DEFAULT:
        return MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig()), MoADepthCLIPImageProcessor()
    if name == OURS_PAPER:
        return MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig(decoder="paper")), MoADepthCLIPImageProcessor()
    if name == DEPTH_ANYTHING:
        # depth-anything/Depth-Anything-V2-Small-hf, with the metric head of Depth-Anything-V2-Metric-Indoor-Small-hf
        config = DepthAnythingConfig(
            backbone_config=dict(
                model_type="dinov2", image_size=518, patch_size=14, hidden_size=384, num_attention_heads=6,
                out_indices=[3, 6, 9, 12], reshape_hidden_states=False,
            ),
            patch_size=14, reassemble_hidden_size=384, reassemble_factors=[4, 2, 1, 0.5],
            neck_hidden_sizes=[48, 96, 192, 384], fusion_hidden_size=64, head_hidden_size=32,
            depth_estimation_type="metric", max_depth=20,
        )
        processor = DPTImageProcessorPil(
            size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14, resample=3,
            image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False,
        )
        return DepthAnythingForDepthEstimation(config), processor
    if name == DPT_HYBRID:
        # Intel/dpt-hybrid-midas: ViT-B/16 on a BiT-ResNet stem (3+4+9 bottleneck blocks), 384x384 input
        config = DPTConfig(
            is_hybrid=True, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072,
            image_size=384, patch_size=16, qkv_bias=True, readout_type="project", backbone_out_indices=[2, 5, 8, 11],
            neck_hidden_sizes=[256, 512, 768, 768], reassemble_factors=[1, 1, 1, 0.5], fusion_hidden_size=256,
            backbone_featmap_shape=[1, 1024, 24, 24], neck_ignore_stages=[0, 1],
        )
        processor = DPTImageProcessorPil(
            size={"height": 384, "width": 384}, keep_aspect_ratio=False, ensure_multiple_of=1, resample=3,
            image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
        )
        return DPTForDepthEstimation(config), processor
    raise ValueError(f"unknown model {name!r}")


def save_models(folder: Path) -> dict:
    folders = {}
    for name in MODELS:
        model, processor = build_model_and_processor(name)
        target = folder / name.replace(" ", "_")
        with contextlib.redirect_stderr(io.StringIO()):
            model.save_pretrained(target)
        processor.save_pretrained(target)
        folders[name] = target
        del model
    return folders


def load_pipeline(folder, dtype="float32"):
    from transformers import AutoConfig, pipeline
    from transformers.utils import logging as hf_logging

    from modeling_moa_depthclip import MoADepthCLIPDepthEstimationPipeline
    from modeling_moa_depthclip.loading import MODEL_TYPES
    from modeling_moa_depthclip.packed_linear import pack_linear_layers

    hf_logging.disable_progress_bar()
    ours = AutoConfig.from_pretrained(str(folder)).model_type in MODEL_TYPES
    # ours: the package's pipeline, as users reach it (`pipeline_class=`); a peer: transformers' own pipeline
    extra = {"pipeline_class": MoADepthCLIPDepthEstimationPipeline} if ours else {}
    pipe = pipeline("depth-estimation", model=str(folder), device="cpu", dtype=dtype, **extra)
    if ours and dtype == "float32":
        pack_linear_layers(pipe.model)  # the CPU fast path the CLI and demo install on the model they load
    return pipe


def load_frames(count: int):
    from PIL import Image

    paths = sorted(DEFAULT_FRAMES.glob("*_colors.png"))[:count]
    frames = [Image.open(path).convert("RGB") for path in paths]
    rng = np.random.default_rng(0)
    while len(frames) < count:  # without the shared frames, noise images of the same size
        frames.append(Image.fromarray(rng.integers(0, 256, (IMAGE_SIZE[1], IMAGE_SIZE[0], 3), dtype=np.uint8)))
    return [frame if frame.size == IMAGE_SIZE else frame.resize(IMAGE_SIZE) for frame in frames]


# --------------------------------------------------------------------------------------------------------------------
# timing helpers


def timed(function):
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved_medians(functions: dict, repeats: int, warmup: int = 1) -> dict:
    """Median seconds of each function, timed round-robin so that background load falls on all of them alike."""
    for _ in range(warmup):
        for function in functions.values():
            function()
    times = {name: [] for name in functions}
    for _ in range(repeats):
        for name, function in functions.items():
            times[name].append(timed(function))
    return {name: float(np.median(values)) for name, values in times.items()}


# --------------------------------------------------------------------------------------------------------------------
# 1. end to end


def bench_end_to_end(pipelines, frames, repeats, batch_repeats):
    image = frames[0]
    latency = interleaved_medians({name: (lambda p=p: p(image)) for name, p in pipelines.items()}, repeats, warmup=2)
    batch = frames[:THROUGHPUT_BATCH]
    batch_time = interleaved_medians(
        {name: (lambda p=p: p(batch, batch_size=THROUGHPUT_BATCH)) for name, p in pipelines.items()},
        batch_repeats, warmup=1,
    )
    # the output really is metric depth at the input size for every model
    for name, p in pipelines.items():
        shape = tuple(p(image)["predicted_depth"].shape)
        if shape != IMAGE_SIZE[::-1]:
            raise RuntimeError(f"{name} returned depth of shape {shape}, expected {IMAGE_SIZE[::-1]}")
    return {
        name: {
            "latency_ms": latency[name] * 1e3,
            "throughput": THROUGHPUT_BATCH / batch_time[name],
            "parameters": sum(p.numel() for p in pipelines[name].model.parameters()),
            "model_input": "x".join(
                map(str, pipelines[name].image_processor(image, return_tensors="pt")["pixel_values"].shape[-2:])
            ),
        }
        for name in pipelines
    }


def _depth_to_float32(module, args, output):
    output["predicted_depth"] = output["predicted_depth"].float()
    return output


def bench_bf16(folders, fp32_pipelines, frames, repeats):
    """Batch-1 latency with bf16 weights and activations (`pipeline(..., dtype="bfloat16")`) for this project's
    default and Depth Anything V2 Small, and how far our bf16 depth is from fp32. Information, not a floor."""
    names = (OURS_DEFAULT, DEPTH_ANYTHING)
    pipes = {name: load_pipeline(folders[name], dtype="bfloat16") for name in names}
    # transformers' stock depth pipeline hands the bf16 tensor to NumPy, which has no bf16; cast it in the forward,
    # before its postprocess, as our pipeline's postprocess does (one small copy)
    pipes[DEPTH_ANYTHING].model.register_forward_hook(_depth_to_float32)
    image = frames[0]
    latency = interleaved_medians({name: (lambda p=p: p(image)) for name, p in pipes.items()}, repeats, warmup=2)
    ours_bf16 = pipes[OURS_DEFAULT](image)["predicted_depth"].float()
    ours_fp32 = fp32_pipelines[OURS_DEFAULT](image)["predicted_depth"].float()
    difference = (ours_bf16 - ours_fp32).abs()
    return {
        "latency_ms": {name: latency[name] * 1e3 for name in names},
        "depth_difference_m": {"mean": float(difference.mean()), "max": float(difference.max())},
    }


# --------------------------------------------------------------------------------------------------------------------
# 2. where the time goes


def bench_stages(pipe, image, repeats):
    """Median ms of the pipeline's own preprocess, forward (inference mode, as `__call__` runs it) and postprocess."""
    stages = {"preprocess": [], "forward": [], "postprocess": [], "end to end": []}
    for step in range(repeats + 2):
        start = time.perf_counter()
        inputs = pipe.preprocess(image)
        after_pre = time.perf_counter()
        outputs = pipe.forward(inputs)
        after_forward = time.perf_counter()
        pipe.postprocess(outputs)
        end = time.perf_counter()
        total = timed(lambda: pipe(image))
        if step >= 2:  # warm-up
            stages["preprocess"].append(after_pre - start)
            stages["forward"].append(after_forward - after_pre)
            stages["postprocess"].append(end - after_forward)
            stages["end to end"].append(total)
    return {name: float(np.median(values)) * 1e3 for name, values in stages.items()}


# --------------------------------------------------------------------------------------------------------------------
# 3. closeness to the machine's limit


def bench_flops(pipelines, repeats):
    """The forward's FLOP/s against torch.mm on a large fp32 matmul."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from modeling_moa_depthclip.packed_linear import unpack_linear_layers

    generator = torch.Generator().manual_seed(0)
    a = torch.randn(MATMUL_N, MATMUL_N, generator=generator)
    b = torch.randn(MATMUL_N, MATMUL_N, generator=generator)
    matmuls = {"matmul (torch.mm)": lambda: torch.mm(a, b)}
    results = {}
    for name in (OURS_DEFAULT, OURS_PAPER):
        model = pipelines[name].model
        pixel_values = torch.randn(THROUGHPUT_BATCH, 3, 224, 224, generator=generator)
        # FLOPs are counted on a plain copy: the counter does not know PackedLinear's oneDNN op, so on the packed
        # model it would see the convolutions alone; the time is the packed model's, as the pipeline runs it
        plain = copy.deepcopy(model)
        unpack_linear_layers(plain)
        with torch.inference_mode():
            counter = FlopCounterMode(display=False)
            with counter:
                plain(pixel_values=pixel_values)
            del plain
            times = interleaved_medians(
                {"forward": lambda: model(pixel_values=pixel_values), **matmuls}, repeats, warmup=2
            )
        flops = counter.get_total_flops()
        by_op = {str(op).split(".")[-1]: count for op, count in counter.get_flop_counts()["Global"].items()}
        rates = {label: 2 * MATMUL_N**3 / times[label] for label in matmuls}
        matmul_rate = max(rates.values())
        results[name] = {
            "gflops": flops / 1e9,
            "forward_ms": times["forward"] * 1e3,
            "achieved": flops / times["forward"] / 1e9,
            "matmul_mkl": rates["matmul (torch.mm)"] / 1e9,
            "matmul": matmul_rate / 1e9,
            "fraction": flops / times["forward"] / matmul_rate,
            "by_op": {op: count / flops for op, count in by_op.items()},
        }
    return results


# --------------------------------------------------------------------------------------------------------------------
# 4./5. memory and training, each in its own process


def _memory_status():
    fields = {}
    with open("/proc/self/status") as status:
        for line in status:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def _reset_peak():
    """Reset the resident-set high-water mark, so VmHWM then measures only what follows (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _peak_of(function):
    baseline = _memory_status()["VmRSS"]
    exact = _reset_peak()
    function()
    peak = _memory_status()["VmHWM"]
    if not exact:  # whole-process peak instead
        import resource

        peak = max(peak, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"peak": peak, "baseline": baseline, "rise": peak - baseline, "exact": exact}


def child_inference_memory(folder, batch_size):
    """Peak memory of the first pipeline call after loading, at one batch size (a fresh process per batch size:
    memory the allocator keeps from an earlier call would hide what a later one needs)."""
    import torch

    frames = load_frames(batch_size)
    pipe = load_pipeline(folder)
    with torch.no_grad():  # page in weights the loader may have memory-mapped, so the rise is the call's own
        for tensor in [*pipe.model.parameters(), *pipe.model.buffers()]:
            tensor.sum()
    if batch_size == 1:
        return _peak_of(lambda: pipe(frames[0]))
    return _peak_of(lambda: pipe(frames, batch_size=batch_size))


def trainable_mask(model, setting):
    if setting == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
    else:
        model.apply_trainable_mask()


def frozen_prefix_report(model):
    """Which encoder blocks run with autograd off during a training forward, observed with forward hooks."""
    import torch

    grad_enabled = {}

    def record(key):
        return lambda module, args, output: grad_enabled.__setitem__(key, torch.is_grad_enabled())

    vision = model.vision_model
    hooks = [vision.embeddings.register_forward_hook(record("embeddings"))] + [
        layer.register_forward_hook(record(i)) for i, layer in enumerate(vision.encoder.layers)
    ]
    model.train()
    model(pixel_values=torch.randn(1, 3, TRAIN_SIZE, TRAIN_SIZE))
    for hook in hooks:
        hook.remove()
    return {
        "prefix_length": model.encoder.frozen_prefix_length(),
        "embeddings_without_graph": not grad_enabled["embeddings"],
        "no_graph_blocks": [i for i, enabled in grad_enabled.items() if i != "embeddings" and not enabled],
        "first_trainable_block": next(
            (i for i, layer in enumerate(model.vision_model.encoder.layers)
             if any(p.requires_grad for p in layer.parameters())), None,
        ),
        "first_moa_block": model.config.moa_layers[0],
    }


def child_training(setting, steps):
    import torch

    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation

    torch.manual_seed(0)
    model = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig())
    trainable_mask(model, setting)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    pixel_values = torch.randn(TRAIN_BATCH, 3, TRAIN_SIZE, TRAIN_SIZE, generator=generator)
    labels = 0.5 + 9.0 * torch.rand(TRAIN_BATCH, TRAIN_SIZE, TRAIN_SIZE, generator=generator)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(pixel_values=pixel_values, labels=labels).loss
        loss.backward()
        optimizer.step()

    # the measured window starts before the first step: it includes AdamW's state and the gradients
    times = []

    def train():
        for _ in range(steps + 1):
            times.append(timed(step))

    memory = _peak_of(train)
    prefix = frozen_prefix_report(model)
    return {
        "step_ms": float(np.median(times[1:])) * 1e3,
        "memory": memory,
        "prefix": prefix,
        "trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "total": sum(p.numel() for p in model.parameters()),
    }


def run_child(*arguments):
    completed = subprocess.run(
        [sys.executable, __file__, "--child", *map(str, arguments)], capture_output=True, text=True,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
    )
    if completed.returncode != 0:
        raise RuntimeError(f"child {arguments} failed:\n{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


def parameter_counts():
    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation

    counts = {}
    for label, config, setting in (
        ("default (multiscale decoder)", MoADepthCLIPConfig(), "mask"),
        ("paper (patch-grid decoder)", MoADepthCLIPConfig(decoder="paper"), "mask"),
        ("full fine-tuning (default network)", MoADepthCLIPConfig(), "full"),
    ):
        model = MoADepthCLIPForDepthEstimation(config)
        trainable_mask(model, setting)
        counts[label] = (
            sum(p.numel() for p in model.parameters() if p.requires_grad),
            sum(p.numel() for p in model.parameters()),
        )
    return counts


# --------------------------------------------------------------------------------------------------------------------
# 6. onnxruntime


def bench_onnx(pipe, frames, folder, repeats):
    import onnxruntime
    import torch

    from conversion.export_onnx import DEFAULT_OPSET, export_onnx
    from conversion.onnx_inference import OnnxDepthEstimator

    path = Path(folder) / "model.onnx"
    logging.getLogger("torch.onnx").setLevel(logging.ERROR)  # "torchvision is not installed" notices
    start = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        export_onnx(pipe.model, pipe.image_processor, path)
    export_s = time.perf_counter() - start
    threads = torch.get_num_threads()
    # without spinning: onnxruntime's busy-waiting threads would slow the PyTorch runs interleaved with them
    estimator = OnnxDepthEstimator(path, intra_op_num_threads=threads, allow_spinning=False)
    session = estimator.session
    results = {"opset": DEFAULT_OPSET, "export_s": export_s, "threads": threads, "ort": onnxruntime.__version__}
    for batch in (1, THROUGHPUT_BATCH):
        pixel_values = pipe.image_processor(frames[:batch], return_tensors="pt")["pixel_values"]
        with torch.inference_mode():
            reference = pipe.model(pixel_values=pixel_values).predicted_depth.numpy()
        array = pixel_values.numpy()
        onnx_depth = session.run(["predicted_depth"], {"pixel_values": array})[0]
        with torch.inference_mode():
            times = interleaved_medians(
                {
                    "ort": lambda: session.run(None, {"pixel_values": array}),
                    "torch": lambda: pipe.model(pixel_values=pixel_values),
                },
                repeats if batch == 1 else max(2, repeats // 3), warmup=2,
            )
        results[f"batch{batch}"] = {
            "ort_ms": times["ort"] * 1e3,
            "torch_ms": times["torch"] * 1e3,
            "max_diff": float(np.abs(onnx_depth - reference).max()),
        }
    image = frames[0]
    timings = interleaved_medians({"onnx": lambda: estimator(image), "pipeline": lambda: pipe(image)}, repeats, 2)
    results["end_to_end_ms"] = timings["onnx"] * 1e3
    results["pipeline_ms"] = timings["pipeline"] * 1e3
    return results


# --------------------------------------------------------------------------------------------------------------------
# report


def machine_description():
    import torch
    import transformers

    cpu = platform.processor() or "unknown CPU"
    try:
        with open("/proc/cpuinfo") as info:
            cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        with open("/proc/meminfo") as info:
            memory = f"{int(next(line for line in info if line.startswith('MemTotal')).split()[1]) / 2**20:.0f} GiB"
    except (OSError, StopIteration):
        memory = "unknown"
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "memory": memory,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "numpy": np.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": _load_average(),
    }


def _load_average():
    try:
        return os.getloadavg()[0]
    except OSError:
        return float("nan")


def _mib(value):
    return f"{value / 2**20:,.0f}"


def _millions(value):
    return f"{value / 1e6:.2f} M"


def render(results, quick) -> str:
    machine = results["machine"]
    e2e = results["end_to_end"]
    ours = e2e[OURS_DEFAULT]
    stages = results["stages"]
    flops = results["flops"]
    training = results["training"]
    memory = results["inference_memory"]
    lines = [
        "# Benchmarks",
        "",
        "Generated by `python benchmarks/run.py" + (" --quick" if quick else "") + "`: do not edit by hand. "
        "Randomly initialised weights (speed and memory do not depend on their values); "
        "every figure of sections 1-6 comes from one run on the machine below, models interleaved round-robin.",
        "",
        f"- machine: {machine['cpu']}, {machine['cores']} cores, {machine['memory']} RAM; "
        f"torch threads {machine['threads']}",
        f"- software: Python {machine['python']}, torch {machine['torch']}, transformers {machine['transformers']}, "
        f"numpy {machine['numpy']}" + (f", onnxruntime {results['onnx']['ort']}" if results.get("onnx") else ""),
        f"- date: {machine['date']}; 1-minute load average {machine['load']:.2f} at the start, "
        f"{results['load_end']:.2f} at the end (the machine is shared: other processes' load shows up as noise)",
        f"- repetitions: {results['repeats']} (batch 1), {results['batch_repeats']} (batch {THROUGHPUT_BATCH}); "
        "medians",
        "",
        "## Floors",
        "",
        "| floor | measured | holds |",
        "| --- | --- | --- |",
    ]
    for floor in results["floors"]:
        lines.append(f"| {floor['floor']} | {floor['measured']} | {'yes' if floor['holds'] else '**no**'} |")
    lines += [
        "",
        "## 1. End to end: 640x480 PIL image in, depth at 640x480 out, through each model's pipeline",
        "",
        "`pipeline(\"depth-estimation\", model=folder)` with each model's own image processor. Ratios are the peer's "
        "time per image over this project's default configuration (above 1: the peer is slower).",
        "",
        f"| model | parameters | model input | batch-1 latency (ms) | x default | "
        f"batch-{THROUGHPUT_BATCH} throughput (img/s) | x default (time/img) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in e2e.items():
        lines.append(
            f"| {name} | {_millions(row['parameters'])} | {row['model_input']} | {row['latency_ms']:.1f} | "
            f"{row['latency_ms'] / ours['latency_ms']:.2f} | {row['throughput']:.2f} | "
            f"{ours['throughput'] / row['throughput']:.2f} |"
        )
    lines += [
        "",
        "Peers: Depth Anything V2 Small = DINOv2-S/14 + DPT head (reassemble 48/96/192/384, fusion 64), metric head "
        "(max depth 20 m, as Depth-Anything-V2-Metric-Indoor-Small), `DPTImageProcessorPil` 518 keep-aspect-ratio, "
        "multiple of 14; DPT-Hybrid = Intel/dpt-hybrid-midas (BiT-ResNet stem + ViT-B/16, neck 256/512/768/768, "
        "fusion 256), `DPTImageProcessorPil` 384x384. transformers' torchvision image processors are not used "
        "(no torchvision here).",
        "",
    ]
    bf16 = results["bf16"]
    ours_bf16 = bf16["latency_ms"][OURS_DEFAULT]
    lines += [
        "### bf16 on this CPU (information, not a floor)",
        "",
        "`pipeline(\"depth-estimation\", model=folder, dtype=\"bfloat16\")`, batch 1, timed round-robin like the table "
        "above. bf16 halves the bytes of every weight and activation and runs on the CPU's bf16 instructions "
        "(AVX512-BF16, AMX) where it has them; it is not the default because it changes the outputs.",
        "",
        "| model | batch-1 latency bf16 (ms) | x default bf16 |",
        "| --- | --- | --- |",
    ]
    for name, value in bf16["latency_ms"].items():
        lines.append(f"| {name} | {value:.1f} | {value / ours_bf16:.2f} |")
    lines += [
        "",
        f"Depth of the default configuration in bf16 against fp32 (random weights): mean difference "
        f"{bf16['depth_difference_m']['mean'] * 1000:.2f} mm, largest {bf16['depth_difference_m']['max'] * 1000:.2f} mm.",
        "",
        "## 2. Where this project's pipeline time goes (batch 1, 640x480)",
        "",
        "| configuration | preprocess (ms) | forward (ms) | postprocess (ms) | pipeline overhead (ms) | end to end (ms) "
        "| pre + post share |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in stages.items():
        overhead = row["end to end"] - row["preprocess"] - row["forward"] - row["postprocess"]
        share = (row["preprocess"] + row["postprocess"]) / row["end to end"]
        lines.append(
            f"| {name} | {row['preprocess']:.1f} ({row['preprocess'] / row['end to end']:.0%}) | "
            f"{row['forward']:.1f} ({row['forward'] / row['end to end']:.0%}) | "
            f"{row['postprocess']:.1f} ({row['postprocess'] / row['end to end']:.0%}) | {overhead:.1f} | "
            f"{row['end to end']:.1f} | {share:.1%} |"
        )
    lines += [
        "",
        "Preprocess = `pipeline.preprocess` (image processor: resize to 224x224, normalise); forward = "
        "`pipeline.forward` (model in inference mode); postprocess = `pipeline.postprocess` (bilinear resize to "
        "640x480, NumPy copy, 8-bit greyscale and Turbo-coloured depth images).",
        "",
        f"## 3. Model forward against the machine's matmul rate (batch {THROUGHPUT_BATCH}, 224x224, fp32)",
        "",
        f"| configuration | GFLOP per batch | forward (ms) | achieved GFLOP/s | {MATMUL_N}x{MATMUL_N} matmul GFLOP/s: "
        "torch.mm | fraction | FLOPs by op |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in flops.items():
        by_op = ", ".join(f"{op} {share:.1%}" for op, share in sorted(row["by_op"].items(), key=lambda kv: -kv[1]))
        lines.append(
            f"| {name} | {row['gflops']:.1f} | {row['forward_ms']:.0f} | {row['achieved']:.0f} | "
            f"{row['matmul_mkl']:.0f} | {row['fraction']:.0%} | {by_op} |"
        )
    lines += [
        "",
        "FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` on the executed forward (2 per multiply-add; "
        "elementwise ops, softmax and normalisation "
        "are not counted, so the fraction understates the work done). The machine's matmul rate is "
        "torch.mm's (MKL) on one large matmul, timed interleaved with the forward.",
        "",
        f"## 4. Training cost (batch {TRAIN_BATCH}, {TRAIN_SIZE}x{TRAIN_SIZE}, AdamW, composite loss)",
        "",
        "| configuration | trainable parameters | total parameters | trainable share |",
        "| --- | --- | --- | --- |",
    ]
    for label, (trainable, total) in results["parameters"].items():
        lines.append(f"| {label} | {_millions(trainable)} | {_millions(total)} | {trainable / total:.1%} |")
    lines += [
        "",
        "| training | time per step (ms) | peak RSS (MiB) | rise over RSS before training (MiB) | "
        "blocks run without autograd graph |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, row in training.items():
        blocks = row["prefix"]["no_graph_blocks"]
        described = f"{blocks[0]}-{blocks[-1]} ({len(blocks)})" if blocks else "none"
        lines.append(
            f"| {label} | {row['step_ms']:.0f} | {_mib(row['memory']['peak'])} | {_mib(row['memory']['rise'])} | "
            f"{described} |"
        )
    prefix = training["default (MoA + last 4 blocks)"]["prefix"]
    lines += [
        "",
        "Each setting runs in its own process. Peak RSS is the kernel's high-water mark (`VmHWM`) reset just before "
        "the first step and read after the last, so it covers gradients, AdamW state and activations; the rise is "
        "over the resident set with the model built, before the first step. "
        f"Frozen prefix in the default configuration: `encoder.frozen_prefix_length()` = {prefix['prefix_length']}; "
        f"the first trainable encoder block is {prefix['first_trainable_block']}, but the first MoA (trainable) "
        f"follows block {prefix['first_moa_block']}, so blocks {prefix['first_moa_block'] + 1}-"
        f"{prefix['first_trainable_block'] - 1 if prefix['first_trainable_block'] else '?'} are frozen yet must "
        "build the graph that carries gradients back to it. Observed with forward hooks during a training "
        f"forward: autograd was off in the patch embeddings "
        f"({'yes' if prefix['embeddings_without_graph'] else 'NO'}) and in blocks {prefix['no_graph_blocks']}.",
        "",
        "## 5. Peak memory of inference (RSS, each model in its own process)",
        "",
        f"| model | peak RSS batch 1 (MiB) | rise (MiB) | peak RSS batch {THROUGHPUT_BATCH} (MiB) | rise (MiB) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, row in memory.items():
        lines.append(
            f"| {name} | {_mib(row['batch1']['peak'])} | {_mib(row['batch1']['rise'])} | "
            f"{_mib(row[f'batch{THROUGHPUT_BATCH}']['peak'])} | {_mib(row[f'batch{THROUGHPUT_BATCH}']['rise'])} |"
        )
    lines += [
        "",
        "Each figure from a fresh process: the pipeline is loaded and every weight read once (so memory-mapped "
        "weights are resident), then one call is measured (a first call, so one-time allocations count). "
        "Peak = resident-set high-water mark of the whole process during the call; rise = peak minus the resident "
        "set just before it.",
    ]
    onnx = results.get("onnx")
    if onnx:
        lines += [
            "",
            f"## 6. ONNX ({OURS_DEFAULT}, opset {onnx['opset']}, onnxruntime {onnx['ort']}, CPU, "
            f"{onnx['threads']} threads, no spinning)",
            "",
            "| batch | onnxruntime forward (ms) | PyTorch forward (ms) | max abs difference (m) |",
            "| --- | --- | --- | --- |",
        ]
        for batch in (1, THROUGHPUT_BATCH):
            row = onnx[f"batch{batch}"]
            lines.append(f"| {batch} | {row['ort_ms']:.1f} | {row['torch_ms']:.1f} | {row['max_diff']:.1e} |")
        lines += [
            "",
            f"End to end without PyTorch (`conversion/onnx_inference.py`: PIL + NumPy preprocessing, onnxruntime, "
            f"bilinear resize to 640x480, no depth pictures): {onnx['end_to_end_ms']:.1f} ms per image, against "
            f"{onnx['pipeline_ms']:.1f} ms for the PyTorch pipeline (which also draws two depth pictures). "
            f"Export took {onnx['export_s']:.0f} s. The session runs with `allow_spinning=False`: onnxruntime's "
            "idle threads otherwise busy-wait after each run and slow the PyTorch runs interleaved with them.",
        ]
    return "\n".join(lines) + "\n"


def evaluate_floors(results):
    e2e = results["end_to_end"]
    stage = results["stages"][OURS_DEFAULT]
    speedup = e2e[DEPTH_ANYTHING]["latency_ms"] / e2e[OURS_DEFAULT]["latency_ms"]
    share = (stage["preprocess"] + stage["postprocess"]) / stage["end to end"]
    fraction = results["flops"][OURS_DEFAULT]["fraction"]
    default = results["training"]["default (MoA + last 4 blocks)"]
    full = results["training"]["full fine-tuning"]
    prefix = default["prefix"]
    expected_prefix = list(range(prefix["prefix_length"]))
    return [
        {
            "floor": f"batch-1 end to end >= {FLOOR_SPEEDUP_VS_DEPTH_ANYTHING:g}x faster than Depth Anything V2 Small",
            "measured": f"{speedup:.1f}x ({e2e[OURS_DEFAULT]['latency_ms']:.1f} vs "
            f"{e2e[DEPTH_ANYTHING]['latency_ms']:.1f} ms)",
            "holds": speedup >= FLOOR_SPEEDUP_VS_DEPTH_ANYTHING,
        },
        {
            "floor": f"pre- + postprocessing <= {FLOOR_PRE_POST_SHARE:.0%} of end to end",
            "measured": f"{share:.1%} ({stage['preprocess']:.1f} + {stage['postprocess']:.1f} of "
            f"{stage['end to end']:.1f} ms)",
            "holds": share <= FLOOR_PRE_POST_SHARE,
        },
        {
            "floor": f"forward at batch {THROUGHPUT_BATCH} >= {FLOOR_MATMUL_FRACTION:.0%} of matmul FLOP/s",
            "measured": f"{fraction:.0%}",
            "holds": fraction >= FLOOR_MATMUL_FRACTION,
        },
        {
            "floor": "frozen blocks before the first trainable parameter run without an autograd graph",
            "measured": f"no graph in the embeddings and blocks {prefix['no_graph_blocks']} "
            f"(`encoder.frozen_prefix_length()` = {prefix['prefix_length']}; first trainable module: MoA after block "
            f"{prefix['first_moa_block']})",
            "holds": prefix["prefix_length"] > 0
            and prefix["embeddings_without_graph"]
            and prefix["no_graph_blocks"] == expected_prefix,
        },
        {
            "floor": f"training peak memory (rise) of default <= {FLOOR_TRAIN_MEMORY_RATIO:g}x full fine-tuning",
            "measured": f"{default['memory']['rise'] / full['memory']['rise']:.2f}x "
            f"({_mib(default['memory']['rise'])} vs {_mib(full['memory']['rise'])} MiB; absolute peak "
            f"{default['memory']['peak'] / full['memory']['peak']:.2f}x)",
            "holds": default["memory"]["rise"] <= FLOOR_TRAIN_MEMORY_RATIO * full["memory"]["rise"],
        },
    ]


def bench_predict_dataset() -> int:
    """images/s of examples/predict_dataset.py with 1 and 2 processes and batch 1 and 8 (benchmarks/predict_dataset.py,
    its own script), printed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("predict_dataset_benchmark", Path(__file__).with_name("predict_dataset.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module.main([])
    return 0


SECTIONS = ("main", "training", "precision", "data", "scaling", "gpu")
SCALING_PLOT = "benchmarks/scaling.png"
RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
DEFAULT_TRAINED_MODEL = REPO_ROOT / "outputs" / "train" / "best"


def run_main_section(args, repeats, batch_repeats, train_steps, progress):
    """Sections 1-6: peers end to end, stages, FLOP/s, training cost, memory, ONNX."""
    results = {"machine": machine_description(), "repeats": repeats, "batch_repeats": batch_repeats,
               "quick": args.quick}
    with tempfile.TemporaryDirectory(prefix="moa_bench_") as tmp:
        progress("building and saving the four models")
        folders = save_models(Path(tmp))
        frames = load_frames(THROUGHPUT_BATCH)

        progress("training cost (one subprocess per setting)")
        results["parameters"] = parameter_counts()
        results["training"] = {
            "default (MoA + last 4 blocks)": run_child("train", "mask", train_steps),
            "full fine-tuning": run_child("train", "full", train_steps),
        }
        progress("inference memory (one subprocess per model)")
        results["inference_memory"] = {
            name: {f"batch{b}": run_child("inference", folders[name], b) for b in (1, THROUGHPUT_BATCH)}
            for name in MODELS
        }
        pipelines = {name: load_pipeline(folders[name]) for name in MODELS}
        progress("end to end, batch 1 and batch 8")
        results["end_to_end"] = bench_end_to_end(pipelines, frames, repeats, batch_repeats)
        progress("bf16, batch 1")
        results["bf16"] = bench_bf16(folders, pipelines, frames, repeats)
        progress("pipeline stages")
        results["stages"] = {name: bench_stages(pipelines[name], frames[0], repeats * 2) for name in (OURS_DEFAULT, OURS_PAPER)}
        progress("FLOP/s against matmul")
        results["flops"] = bench_flops(pipelines, repeats)
        if not args.skip_onnx:
            progress("ONNX export and onnxruntime")
            results["onnx"] = bench_onnx(pipelines[OURS_DEFAULT], frames, tmp, repeats)
    results["load_end"] = _load_average()
    results["floors"] = evaluate_floors(results)
    return results


def run_precision_section(args, repeats, progress):
    """Section 7: the CPU candidates side by side, the int8 pipeline end to end, int8 accuracy on NYU frames."""
    import precision

    from PIL import Image

    results = {"machine": machine_description(), "repeats": repeats}
    model, processor = build_model_and_processor(OURS_DEFAULT)
    with tempfile.TemporaryDirectory(prefix="moa_bench_") as tmp:
        progress("CPU candidates, 224x224 (compile, export and quantisation included as first-call time)")
        results["candidates"] = precision.bench_candidates(
            model, processor, repeats, sizes=((224, 224),), compile_model=not args.skip_compile, scratch=tmp,
        )
        progress("CPU candidates, 480x640 model input")
        larger = precision.bench_candidates(model, processor, repeats, sizes=((480, 640),), compile_model=False,
                                            scratch=tmp)
        results["candidates"]["sizes"].update(larger["sizes"])
        folder = Path(tmp) / "default"
        with contextlib.redirect_stderr(io.StringIO()):
            model.save_pretrained(folder)
            processor.save_pretrained(folder)
        del model
        os.environ.setdefault("MOA_DEPTHCLIP_CACHE", str(Path(tmp) / "cache"))
        frames = {"640x480 image": load_frames(1)[0], "224x224 image": load_frames(1)[0].resize((224, 224), Image.BICUBIC)}
        progress("pipelines end to end: float32 (default) against int8")
        results["pipelines"] = precision.bench_pipelines(folder, frames, repeats, dtypes=("float32", "bfloat16", "int8"))
    trained = Path(args.model_dir) if args.model_dir else DEFAULT_TRAINED_MODEL
    if trained.is_dir() and DEFAULT_FRAMES.is_dir():
        progress(f"bf16 and int8 against fp32 on the NYU frames with {trained}")
        results["accuracy"] = precision.nyu_accuracy(trained, DEFAULT_FRAMES)
        results["accuracy"]["model"] = str(args.model_dir or trained.relative_to(REPO_ROOT))
    else:
        results["accuracy"] = {"missing": f"no trained model at {trained} (pass --model-dir) or no NYU frames"}
    return results


def save_section(results_dir: Path, name, result):
    results_dir.mkdir(parents=True, exist_ok=True)
    (results_dir / f"{name}.json").write_text(json.dumps(result, indent=1, default=str) + "\n")


def load_sections(results_dir: Path):
    found = {}
    for name in SECTIONS:
        path = results_dir / f"{name}.json"
        if path.is_file():
            found[name] = json.loads(path.read_text())
    return found


KEPT_NOTE = ("> Sections 1-6 below are kept from an earlier run of `benchmarks/run.py` (its date is in the list "
             "below); `python benchmarks/run.py --sections main` measures them again.")


def kept_main_part(previous: Path) -> str | None:
    """Sections 1-6 of an existing report, for a run that measured only other sections."""
    if not previous.is_file():
        return None
    text = previous.read_text()
    end = text.find("\n## 7.")
    part = (text if end < 0 else text[:end]).rstrip("\n")
    if KEPT_NOTE not in part:
        header, _, rest = part.partition("\n\n")
        part = f"{header}\n\n{KEPT_NOTE}\n\n{rest}"
    return part


def render_all(sections, previous: Path) -> str:
    import gpu
    import precision

    parts = []
    kept = None if "main" in sections else kept_main_part(previous)
    if "main" in sections:
        main_part = render(sections["main"], sections["main"].get("quick", False)).rstrip("\n")
        header, _, rest = main_part.partition("\n\n")
        parts.append(f"{header}\n\n> Sections 1-6 come from one run (its date is in the list below); sections 4b "
                     f"and 7-10 each name the run they come from.\n\n{rest}")
    elif kept:
        parts.append(kept)
    else:
        parts.append("# Benchmarks\n\nSections 1-6 have not been run on this tree yet (`python benchmarks/run.py "
                     "--sections main`).")
    if "training" in sections:
        import training_profile

        parts.append("\n".join(training_profile.render_training_profile(sections["training"])))
    if "precision" in sections:
        parts.append("\n".join(precision.render_precision(sections["precision"])))
    if "data" in sections:
        import data_loading

        training = (sections.get("main") or {}).get("training")
        images_per_s = {label: TRAIN_BATCH / (row["step_ms"] / 1e3) for label, row in training.items()} if training else None
        parts.append("\n".join(data_loading.render_data(sections["data"], images_per_s)))
    if "gpu" in sections:
        parts.append("\n".join(gpu.render_gpu(sections["gpu"])))
    if "scaling" in sections:
        import scaling

        parts.append("\n".join(scaling.render_scaling(sections["scaling"], SCALING_PLOT)))
    return "\n\n".join(parts) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (about half the runtime)")
    parser.add_argument("--output", default=str(REPO_ROOT / "BENCHMARKS.md"), help="report to write")
    parser.add_argument("--no-write", action="store_true", help="print the report without writing it")
    parser.add_argument(
        "--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS),
        help="sections to run (default: all); the others keep their figures from benchmarks/results/",
    )
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: run only the GPU section (inference throughput, bf16 training)")
    parser.add_argument("--model-dir", default=None,
                        help=f"trained model for the int8 accuracy on NYU frames (default {DEFAULT_TRAINED_MODEL})")
    parser.add_argument("--render-only", action="store_true",
                        help="measure nothing: write BENCHMARKS.md from the kept figures in --results-dir")
    parser.add_argument("--results-dir", default=str(RESULTS_DIR), help="where each section's figures are kept")
    parser.add_argument("--skip-onnx", action="store_true", help="leave out the ONNX export and onnxruntime timing")
    parser.add_argument("--skip-compile", action="store_true", help="leave out the torch.compile candidate")
    parser.add_argument(
        "--only-predict-dataset", action="store_true",
        help="only the images/s of examples/predict_dataset.py (1 and 2 processes, batch 1 and 8), printed",
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.only_predict_dataset:
        return bench_predict_dataset()

    if args.child:
        kind, *rest = args.child
        if kind == "inference":
            result = child_inference_memory(rest[0], int(rest[1]))
        else:
            result = child_training(rest[0], int(rest[1]))
        print(json.dumps(result))
        return 0

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    repeats, batch_repeats, train_steps = (4, 1, 2) if args.quick else (10, 3, 4)
    sections = [] if args.render_only else ["gpu"] if args.device == "cuda" else args.sections
    results_dir = Path(args.results_dir)
    started = time.perf_counter()

    def progress(message):
        print(f"[{time.perf_counter() - started:6.1f} s] {message}", file=sys.stderr, flush=True)

    if "gpu" in sections:
        import gpu

        progress("GPU section")
        result = gpu.bench_gpu("cuda")
        if "unavailable" in result:
            print(result["unavailable"])
        save_section(results_dir, "gpu", {**result, "date": machine_description()["date"]})
    if "main" in sections:
        save_section(results_dir, "main", run_main_section(args, repeats, batch_repeats, train_steps, progress))
    if "training" in sections:
        import training_profile

        progress("training step: where the time goes")
        save_section(results_dir, "training", {**training_profile.bench_training_profile(DEFAULT_FRAMES),
                                               "date": machine_description()["date"]})
    if "precision" in sections:
        save_section(results_dir, "precision", run_precision_section(args, repeats, progress))
    if "data" in sections:
        import data_loading

        progress("data: frames/s per worker for each source kind")
        save_section(results_dir, "data", {**data_loading.bench_data(DEFAULT_FRAMES, repeats=2 if args.quick else 3),
                                           "date": machine_description()["date"]})
    if "scaling" in sections:
        import scaling

        progress("scaling: latency and memory against input size and batch")
        result = {**scaling.bench_scaling(repeats=1 if args.quick else 2), "date": machine_description()["date"]}
        save_section(results_dir, "scaling", result)
        scaling.plot_scaling(result, REPO_ROOT / SCALING_PLOT)
    progress("done")

    report = render_all(load_sections(results_dir), Path(args.output))
    if not args.no_write:
        Path(args.output).write_text(report)
        print(f"wrote {args.output}", file=sys.stderr)
    else:
        print(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
