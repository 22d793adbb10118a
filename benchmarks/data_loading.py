"""Frames/s of one data worker for each source kind, today's path (augment the full frame, the collator resizes)
against the training view at the model input size, and for file sources that view on frames decoded once
(`TrainingExamples(..., decoded_cache=...)`, steady state: the cache is built before timing). Used by
`benchmarks/run.py` (section "data").

A worker's work per frame: read and decode the stored frame, augment, and its share of collating a batch of 8.
Measured in this process, one thread, the paths interleaved frame by frame over the same keys.
"""

from __future__ import annotations

import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np


INPUT_SIZE = (224, 224)
BATCH = 8
TODAY = "today (augment the full frame, collator resizes)"
INPUT = "at the model input size"
DECODED = "decoded once, at the model input size"


def _write_tar_shard(frames_dir: Path, folder: Path, count: int) -> Path:
    """A fast-depth `.h5` tar shard of the shared frames (the published layout: rgb uint8 3xHxW, depth float32)."""
    import h5py

    from modeling_moa_depthclip.data import read_depth_image, read_rgb_image

    colours = sorted(frames_dir.glob("*_colors.png"))[:count]
    staging = folder / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    shard = folder / "data" / "val-000000.tar"
    shard.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(shard, "w") as tar:
        for i, colour in enumerate(colours):
            rgb = np.asarray(read_rgb_image(colour))
            depth = read_depth_image(colour.with_name(colour.name.replace("_colors", "_depth")))
            path = staging / f"{i}.h5"
            with h5py.File(path, "w") as h5:
                h5.create_dataset("rgb", data=np.ascontiguousarray(np.transpose(rgb, (2, 0, 1))))
                h5.create_dataset("depth", data=depth.astype(np.float32))
            tar.add(path, arcname=f"val/official/{i + 1:05d}.h5")
    return shard


def bench_data(frames_dir, repeats: int = 3):
    import torch

    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPImageProcessor
    from modeling_moa_depthclip.data import (
        DecodedFrames, DepthAugmentation, DepthCollator, TrainingExamples, load_depth_dataset,
    )

    torch.set_num_threads(1)  # a loader worker's share of the machine
    config = MoADepthCLIPConfig()
    depth_range = {"min_depth": config.min_depth, "max_depth": config.max_depth}
    collator = DepthCollator(MoADepthCLIPImageProcessor(), INPUT_SIZE)
    augmentation = DepthAugmentation()
    results = {}
    with tempfile.TemporaryDirectory(prefix="moa_data_") as tmp:
        shard = _write_tar_shard(Path(frames_dir), Path(tmp), 16)
        sources = {
            "DenseDepth PNG folder (640x480)": load_depth_dataset(frames_dir, split="test", **depth_range),
            "fast-depth .h5 tar shard (640x480)": load_depth_dataset(shard, **depth_range),
            "synthetic scenes (240x320, rendered once, cached)": load_depth_dataset(
                "synthetic", split="train", num_samples=16, height=240, width=320, **depth_range),
        }
        for name, dataset in sources.items():
            cache = name.startswith("synthetic")
            views = {
                TODAY: TrainingExamples(dataset, augmentation, 0, cache),
                INPUT: TrainingExamples(dataset, augmentation, 0, cache, target_size=INPUT_SIZE),
            }
            if not cache:  # decoding once is for file sources; built here, so the timing is the steady state
                folder = Path(tmp) / "decoded" / str(len(results))
                DecodedFrames(dataset, folder).prepare(progress=False)
                views[DECODED] = TrainingExamples(dataset, augmentation, 0, target_size=INPUT_SIZE, decoded_cache=folder)
            if cache:  # rendering is a one-time cost of the cached source: not part of a worker's steady state
                for view in views.values():
                    for index in range(len(dataset)):
                        view._example(index)
            count = min(len(dataset), 16) // BATCH * BATCH
            times = {label: [] for label in views}
            for repeat in range(repeats):
                for start in range(0, count, BATCH):
                    keys = [repeat * len(dataset) + start + i for i in range(BATCH)]
                    for label, view in views.items():
                        begin = time.perf_counter()
                        collator([view[key] for key in keys])
                        times[label].append((time.perf_counter() - begin) / BATCH)
            results[name] = {label: 1.0 / float(np.median(values)) for label, values in times.items()}
    return {"frames_per_s": results, "input_size": INPUT_SIZE, "batch": BATCH}


def render_data(result, training_images_per_s: dict | None) -> list[str]:
    size = "x".join(map(str, result["input_size"]))
    lines = [
        f"## 8. Data: frames/s of one loader worker at the training resolution ({size}, batch {result['batch']})",
        "",
        (f"Run of {result['date']}. " if result.get("date") else "") + "Per frame: read and decode, augment (flip, zoom and crop, rotation, colour jitter), and its share of "
        "collating the batch; one thread, the two paths interleaved over the same frames and draws. Today's path "
        "augments the full frame and lets the collator resize it; the training view now samples the augmented "
        "frame once at the model input size (`TrainingExamples(..., target_size=input_size)`, what "
        "`examples/train.py` uses). Decoded once: the same view reading frames that were decoded once into "
        "memory-mapped `.npy` files (`TrainingExamples(..., decoded_cache=folder)`, `examples/train.py "
        "--decoded_cache_dir`); steady state, the cache built before timing (building it costs one decode per frame).",
        "",
        "| source | today (frames/s) | at the model input size (frames/s) | x today | decoded once (frames/s) | x today |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in result["frames_per_s"].items():
        old, new, decoded = row[TODAY], row[INPUT], row.get(DECODED)
        once = f"{decoded:.1f} | {decoded / old:.2f}" if decoded else "— (rendered once, cached in memory) | —"
        lines.append(f"| {name} | {old:.1f} | {new:.1f} | {new / old:.2f} | {once} |")
    if training_images_per_s:
        lines += ["", "The model's training step, for comparison (section 4, batch 8, 224x224, this CPU): " + ", ".join(
            f"{label} {value:.1f} images/s" for label, value in training_images_per_s.items()) + "."]
    return lines
