"""Export a saved MoA-DepthCLIP model to ONNX and check it against PyTorch in onnxruntime.

    python -m conversion.export_onnx --model PATH --output model.onnx [--images FILE_OR_DIR ...] [--overwrite]
    python -m conversion.export_onnx --model PATH --output model-int8.onnx --quantize int8

`--quantize int8` writes the graph with onnxruntime's dynamic int8 quantisation
(`onnxruntime.quantization.quantize_dynamic`: int8 weights per output channel, activations quantised per call),
the fastest CPU route BENCHMARKS.md measured; it is compared with the fp32 PyTorch model against
`--tolerance` (default 1 cm for int8, as the quantised depth is an approximation).

The ONNX graph takes `pixel_values` float32 `(batch, 3, height, width)` (the image processor's output; the batch
axis is dynamic, height and width are fixed to the processor's size) and returns `predicted_depth` float32
`(batch, height, width)` in metres, and for a model with depth bins (every head but `"regression"`) a second output
`depth_uncertainty` of the same shape: the standard deviation of the per-pixel bin distribution in metres.
ONNX opset 18 (default ai.onnx domain; `--opset` changes it), written by
`torch.onnx.export(dynamo=True)`. The image processor's settings are stored in the file's metadata under
`moa_depthclip.preprocessing`, so the `.onnx` file alone is enough to run it.

After export the script runs `onnx.checker.check_model`, then compares onnxruntime with PyTorch on real frames
(by default 4 frames of ../shared/data/nyu_eigen_test_sample; `--images` for others) at batch 1 and at batch N,
and the torch-free inference path end to end with the PyTorch pipeline's depth (and uncertainty) at image size. It
prints the largest absolute difference in metres and exits with status 1 if it exceeds `--tolerance` (1e-3 m).

Running the exported model without PyTorch (only numpy, pillow and onnxruntime) is what
`conversion.onnx_inference` does, without importing torch:

    from conversion.onnx_inference import OnnxDepthEstimator
    estimator = OnnxDepthEstimator("model.onnx")
    depth_metres = estimator("room.png")   # float32 (height, width) at the image's size

or, by hand:

    import json, numpy as np, onnxruntime
    from PIL import Image
    session = onnxruntime.InferenceSession("model.onnx")
    settings = json.loads(session.get_modelmeta().custom_metadata_map["moa_depthclip.preprocessing"])
    h, w = settings["size"]["height"], settings["size"]["width"]
    rgb = np.asarray(Image.open("room.png").convert("RGB"), dtype=np.float32) / 255
    rgb = np.stack([np.asarray(Image.fromarray(rgb[..., c], mode="F").resize((w, h), Image.BICUBIC))
                    for c in range(3)]).clip(0, 1)                 # antialiased bicubic, as the processor does
    mean = np.array(settings["image_mean"], np.float32)[:, None, None]
    std = np.array(settings["image_std"], np.float32)[:, None, None]
    depth = session.run(["predicted_depth"], {"pixel_values": ((rgb - mean) / std)[None].astype(np.float32)})[0][0]
    # depth: metres at h x w; resize bilinearly to the image size (conversion.onnx_inference.resize_bilinear)

Exit status: 0 on success, 1 if the comparison exceeds the tolerance, 2 for bad arguments (a missing model folder,
an output file that exists without `--overwrite`, no images).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

if __package__ in (None, ""):
    sys.exit(f"run this from the repository root as a module: python -m conversion.{Path(__file__).stem} ...")

from conversion.onnx_inference import OnnxDepthEstimator  # noqa: E402
from modeling_moa_depthclip.onnx_export import (  # noqa: E402, F401  (the package's exporter; re-exported here)
    DEFAULT_OPSET,
    QUANTIZATIONS,
    export_onnx as _export_onnx,
    output_names,
    preprocessing_settings,
    quantize_onnx_int8,
)


DEFAULT_TOLERANCE_M = 1e-3
# int8 depth approximates fp32's: the bound users are promised for the quantised path (BENCHMARKS.md measures it)
INT8_TOLERANCE_M = 1e-2
DEFAULT_NUM_IMAGES = 4
DEFAULT_IMAGES = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "nyu_eigen_test_sample"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


class ExportError(Exception):
    """A problem with the arguments, reported in one line."""


def export_onnx(model, processor, output, opset: int = DEFAULT_OPSET, quantize: str | None = None) -> Path:
    """`modeling_moa_depthclip.onnx_export.export_onnx` with a bad `quantize` reported as an `ExportError`."""
    try:
        return _export_onnx(model, processor, output, opset=opset, quantize=quantize)
    except ValueError as error:
        raise ExportError(str(error)) from None


def onnx_opset(path) -> int:
    import onnx

    model = onnx.load(os.fspath(path), load_external_data=False)
    return next(entry.version for entry in model.opset_import if entry.domain in ("", "ai.onnx"))


def compare_with_pytorch(model, processor, onnx_path, images) -> dict:
    """Largest |onnxruntime - PyTorch| in metres: the raw graph at batch 1 and batch N, and the torch-free path."""
    import numpy as np
    import onnxruntime
    import torch

    session = onnxruntime.InferenceSession(os.fspath(onnx_path), providers=["CPUExecutionProvider"])
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    names = [output.name for output in session.get_outputs()]
    with torch.no_grad():
        outputs = model(pixel_values=pixel_values)
    reference = {name: outputs[name] for name in names}
    result = {}
    for batch in sorted({1, len(images)}):
        found = session.run(names, {"pixel_values": pixel_values[:batch].numpy()})
        for name, values in zip(names, found):
            suffix = "" if name == "predicted_depth" else f" {name}"
            result[f"batch {batch}{suffix}"] = float(np.abs(values - reference[name][:batch].numpy()).max())
    # the torch-free path, end to end: image in, maps at the image's size out, against the PyTorch postprocessing
    targets = [image.size[::-1] for image in images]
    torch_results = processor.post_process_depth_estimation(reference, targets)
    onnx_results = OnnxDepthEstimator(onnx_path).estimate(list(images))
    for key in ("predicted_depth", "uncertainty"):
        if key in torch_results[0]:
            suffix = "" if key == "predicted_depth" else f" {key}"
            result[f"torch-free path at image size{suffix}"] = max(
                float(np.abs(ours[key] - theirs[key].numpy()).max())
                for ours, theirs in zip(onnx_results, torch_results)
            )
    return result


def collect_images(sources, limit: int) -> list[Path]:
    paths = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            found = sorted(p for p in source.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            # a DenseDepth-layout folder holds depth PNGs beside the frames: take the colour frames only
            colours = [p for p in found if p.stem.endswith("_colors")]
            paths.extend(colours or found)
        elif source.is_file():
            paths.append(source)
        else:
            raise ExportError(f"image source {source} does not exist")
    if not paths:
        raise ExportError(f"no images found in {', '.join(map(str, sources))}")
    return paths[:limit]


def load_model_and_processor(folder):
    from modeling_moa_depthclip.loading import ModelLoadError, load_model_and_processor as load

    try:
        return load(folder)
    except ModelLoadError as error:
        raise ExportError(str(error)) from None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=f"Export MoA-DepthCLIP to ONNX (opset {DEFAULT_OPSET} by default, dynamic batch) and check it "
        "against PyTorch in onnxruntime.",
    )
    parser.add_argument("--model", required=True, help="folder written by save_pretrained (config.json + weights)")
    parser.add_argument("--output", required=True, help="the .onnx file to write")
    parser.add_argument("--opset", type=int, default=DEFAULT_OPSET, help=f"ONNX opset (default {DEFAULT_OPSET})")
    parser.add_argument(
        "--images", nargs="+", default=[str(DEFAULT_IMAGES)],
        help="image files or folders to compare on (default: the shared NYU Eigen test sample)",
    )
    parser.add_argument("--num-images", type=int, default=DEFAULT_NUM_IMAGES, help="frames compared (default 4)")
    parser.add_argument(
        "--quantize", choices=QUANTIZATIONS, default=None,
        help="write onnxruntime's dynamic int8 quantisation of the graph (faster on CPU; depth within about 1 cm)",
    )
    parser.add_argument(
        "--tolerance", type=float, default=None,
        help=f"largest allowed difference in metres (default {DEFAULT_TOLERANCE_M:g}; {INT8_TOLERANCE_M:g} with "
        "--quantize int8)",
    )
    parser.add_argument("--overwrite", action="store_true", help="replace --output if it exists")
    args = parser.parse_args(argv)

    try:
        output = Path(args.output)
        if output.exists() and not args.overwrite:
            raise ExportError(f"output file {output} exists; pass --overwrite to replace it")
        if output.is_dir():
            raise ExportError(f"output {output} is a directory, not a file")
        if args.num_images < 1:
            raise ExportError(f"--num-images must be >= 1, got {args.num_images}")
        image_paths = collect_images(args.images, args.num_images)
        model, processor = load_model_and_processor(args.model)
    except ExportError as error:
        print(f"export_onnx: error: {error}", file=sys.stderr)
        return 2

    from modeling_moa_depthclip import load_image_file

    images = [load_image_file(path) for path in image_paths]
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    export_onnx(model, processor, output, opset=args.opset, quantize=args.quantize)
    tolerance = args.tolerance if args.tolerance is not None else (
        INT8_TOLERANCE_M if args.quantize == "int8" else DEFAULT_TOLERANCE_M
    )
    print(f"wrote {output} (ONNX opset {onnx_opset(output)}{', int8' if args.quantize else ''}, "
          f"{output.stat().st_size / 2**20:.1f} MiB); "
          "onnx.checker: passed")
    differences = compare_with_pytorch(model, processor, output, images)
    worst = max(differences.values())
    details = ", ".join(f"{name}: {value:.2e} m" for name, value in differences.items())
    print(f"max |onnxruntime - PyTorch| on {len(images)} frames = {worst:.2e} m ({details}); "
          f"tolerance {tolerance:g} m")
    if worst > tolerance:
        print("export_onnx: error: the exported model does not match PyTorch within the tolerance", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
