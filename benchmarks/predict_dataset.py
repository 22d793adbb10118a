"""Throughput of examples/predict_dataset.py: images/s with 1 and 2 processes and with batch 1 and 8.

    python benchmarks/predict_dataset.py               # 48 NYU-sized images, the default configuration
    python benchmarks/predict_dataset.py --images 96

The model is the default MoA-DepthCLIP configuration with random weights (speed does not depend on the weight
values) saved with `save_pretrained`; the images are 640x480 crops of the shared NYU frames, written as PNG files in
an image folder. Each setting is a fresh run of the script into an empty folder; the figure is the script's own
`this_run.images_per_second` (reading, decoding, the model, depth encoding and shard writing, without the start-up).
The machine's cores are split between the processes (`OMP_NUM_THREADS` = cores / processes), so 1 and 2 processes
use the same CPUs. `measure()` returns the figures for benchmarks/run.py.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))
sys.path.insert(1, str(REPO_ROOT / "examples"))
from modeling_moa_depthclip.evaluation import nyu_sample_dir  # noqa: E402
from sample_data import NYU_SAMPLE_DIR  # noqa: E402  the scripts' one choice of the NYU frames

DEFAULT_FRAMES = nyu_sample_dir(NYU_SAMPLE_DIR) or NYU_SAMPLE_DIR
SCRIPT = REPO_ROOT / "examples" / "predict_dataset.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
SETTINGS = ((1, 1), (1, 8), (2, 8))  # (processes, batch size)


def build_inputs(folder: Path, num_images: int, frames_dir: Path = DEFAULT_FRAMES) -> tuple[Path, Path]:
    """A saved default-configuration model and an image folder of `num_images` 640x480 frames."""
    from PIL import Image

    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation, MoADepthCLIPImageProcessor

    model_dir, images_dir = folder / "model", folder / "images"
    MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig()).save_pretrained(model_dir)
    MoADepthCLIPImageProcessor().save_pretrained(model_dir)
    images_dir.mkdir()
    frames = sorted(frames_dir.glob("*_colors.png"))
    if not frames:
        raise SystemExit(f"no *_colors.png frames in {frames_dir}")
    for index in range(num_images):
        with Image.open(frames[index % len(frames)]) as frame:
            frame.convert("RGB").resize((640, 480)).save(images_dir / f"frame_{index:05d}.png")
    return model_dir, images_dir


def run_setting(model_dir: Path, images_dir: Path, output_dir: Path, num_processes: int, batch_size: int) -> dict:
    """One run of the script; its summary."""
    threads = max(1, (os.cpu_count() or 1) // num_processes)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", PYTHONPATH=str(REPO_ROOT))
    arguments = ["--model", model_dir, "--dataset", images_dir, "--output_dir", output_dir, "--batch_size", batch_size,
                 "--shard_size", 8, "--num_workers", 1]
    if num_processes == 1:
        command = [sys.executable, SCRIPT, *arguments]
    else:
        env["ACCELERATE_USE_CPU"] = "true"  # gloo CPU ranks from accelerate's torchrun launcher
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", num_processes, "--num_machines", 1,
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", 0, SCRIPT, *arguments]
    completed = subprocess.run([str(part) for part in command], env=env, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"predict_dataset.py failed ({num_processes} processes, batch {batch_size}):\n"
                         f"{completed.stderr[-2000:]}")
    return json.loads((output_dir / "summary.json").read_text())


def measure(num_images: int = 48, frames_dir: Path = DEFAULT_FRAMES) -> list[dict]:
    """images/s for each (processes, batch size) of `SETTINGS`, measured in this one call."""
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        model_dir, images_dir = build_inputs(folder, num_images, frames_dir)
        rows = []
        for num_processes, batch_size in SETTINGS:
            summary = run_setting(model_dir, images_dir, folder / f"out_{num_processes}_{batch_size}", num_processes,
                                  batch_size)
            assert summary["num_processes"] == num_processes and summary["written_rows"] == num_images
            rows.append({"processes": num_processes, "batch_size": batch_size, "images": num_images,
                         "images_per_second": summary["this_run"]["images_per_second"]})
        return rows


def render(rows: list[dict]) -> list[str]:
    """The figures as a Markdown table."""
    base = rows[0]["images_per_second"]
    lines = ["| processes | batch | images/s | vs 1 process, batch 1 |", "|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['processes']} | {row['batch_size']} | {row['images_per_second']:.2f} | "
                     f"{row['images_per_second'] / base:.2f}x |")
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=48, help="images in the folder (default 48)")
    parser.add_argument("--frames", type=Path, default=DEFAULT_FRAMES, help="folder of *_colors.png frames")
    args = parser.parse_args(argv)
    rows = measure(args.images, args.frames)
    print(f"examples/predict_dataset.py, default configuration, {args.images} images of 640x480, "
          f"{os.cpu_count()} CPU cores")
    print("\n".join(render(rows)))


if __name__ == "__main__":
    main()
