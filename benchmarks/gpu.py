"""The GPU path: inference throughput (batch 1 and 32; fp32, bf16, compiled) and training images/s with bf16 mixed
precision and the data loader in the loop. Used by `benchmarks/run.py --device cuda` (section "gpu").

On a machine without a CUDA GPU, `bench_gpu` returns one line saying so and measures nothing.
"""

from __future__ import annotations

import os
import time

import numpy as np


INFERENCE_BATCHES = (1, 32)
TRAIN_BATCH = 32
TRAIN_STEPS = 20
INPUT_SIZE = 224


def no_gpu_line(device: str = "cuda") -> str | None:
    """One line saying why no GPU figure is measured, or None where `device` is usable."""
    import torch

    if not torch.cuda.is_available():
        return (f"No GPU available: torch {torch.__version__} sees no CUDA device "
                "(torch.cuda.is_available() is False), so no GPU figure was measured.")
    try:
        torch.device(device)
        torch.empty(1, device=device)
    except (RuntimeError, AssertionError) as error:
        return f"No GPU available: {device} cannot be used ({str(error).splitlines()[0]})."
    return None


def _cuda_timed(function, repeats, warmup=3):
    import torch

    for _ in range(warmup):
        function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def bench_inference(device, repeats=20):
    """Images/s of the default model's forward for fp32, bf16 and `torch.compile` (bf16, inductor)."""
    import torch

    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation

    torch.manual_seed(0)
    fp32 = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig()).eval().to(device)
    bf16 = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig()).eval().to(device, torch.bfloat16)
    bf16.load_state_dict(fp32.state_dict())
    start = time.perf_counter()
    compiled = torch.compile(bf16)
    results = {"images_per_s": {}, "compile_s": None}
    with torch.inference_mode():
        for batch in INFERENCE_BATCHES:
            x = torch.randn(batch, 3, INPUT_SIZE, INPUT_SIZE, device=device)
            xb = x.to(torch.bfloat16)
            if results["compile_s"] is None:
                compiled(pixel_values=xb)
                torch.cuda.synchronize()
                results["compile_s"] = time.perf_counter() - start
            runs = {
                "fp32": lambda: fp32(pixel_values=x),
                "bf16": lambda: bf16(pixel_values=xb),
                "bf16 compiled": lambda: compiled(pixel_values=xb),
            }
            results["images_per_s"][batch] = {name: batch / _cuda_timed(f, repeats) for name, f in runs.items()}
    return results


def bench_training(device, num_workers=None, steps=TRAIN_STEPS):
    """Training images/s of the default configuration with bf16 autocast, AdamW, and the real data path in the loop:
    synthetic scenes -> `TrainingExamples` (augmentation) -> `DepthCollator` in `num_workers` loader processes."""
    import torch
    from torch.utils.data import DataLoader

    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation, MoADepthCLIPImageProcessor
    from modeling_moa_depthclip.data import DepthAugmentation, DepthCollator, TrainingExamples, load_depth_dataset

    num_workers = num_workers if num_workers is not None else min(8, os.cpu_count() or 1)
    torch.manual_seed(0)
    model = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig()).to(device)
    model.apply_trainable_mask()
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    base = load_depth_dataset("synthetic", split="train", num_samples=64, height=240, width=320,
                              min_depth=model.config.min_depth, max_depth=model.config.max_depth)
    examples = TrainingExamples(base, DepthAugmentation(), seed=0, cache=True)
    loader = DataLoader(
        examples, batch_size=TRAIN_BATCH, shuffle=True, drop_last=True, num_workers=num_workers,
        collate_fn=DepthCollator(MoADepthCLIPImageProcessor(), (INPUT_SIZE, INPUT_SIZE)), persistent_workers=num_workers > 0,
        pin_memory=True,
    )

    def batches():
        while True:
            yield from loader

    stream = batches()
    times = []
    for step in range(steps + 2):
        start = time.perf_counter()
        batch = next(stream)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(pixel_values=batch["pixel_values"].to(device, non_blocking=True),
                         labels=batch["labels"].to(device, non_blocking=True)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if step >= 2:  # the first steps start the workers and the kernels
            times.append(time.perf_counter() - start)
    return {"images_per_s": TRAIN_BATCH / float(np.median(times)), "num_workers": num_workers, "batch": TRAIN_BATCH}


def bench_gpu(device="cuda"):
    line = no_gpu_line(device)
    if line is not None:
        return {"unavailable": line}
    import torch

    return {
        "device": torch.cuda.get_device_name(torch.device(device)),
        "inference": bench_inference(device),
        "training": bench_training(device),
    }


def render_gpu(result) -> list[str]:
    lines = ["## 9. GPU", ""]
    if "unavailable" in result:
        return lines + [result["unavailable"]]
    inference = result["inference"]
    lines += [
        f"{result['device']}; default configuration, {INPUT_SIZE}x{INPUT_SIZE}, medians.",
        "",
        "| forward | " + " | ".join(f"batch {b} (img/s)" for b in inference["images_per_s"]) + " |",
        "| --- | " + " | ".join("---" for _ in inference["images_per_s"]) + " |",
    ]
    for name in ("fp32", "bf16", "bf16 compiled"):
        lines.append(f"| {name} | " + " | ".join(
            f"{row[name]:.1f}" for row in inference["images_per_s"].values()) + " |")
    training = result["training"]
    lines += [
        "",
        f"`torch.compile` (inductor) took {inference['compile_s']:.0f} s before its first output. Training "
        f"(bf16 autocast, AdamW, batch {training['batch']}, the synthetic data path with augmentation in "
        f"{training['num_workers']} loader processes in the loop): {training['images_per_s']:.1f} images/s.",
    ]
    return lines
