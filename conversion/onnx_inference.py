"""Metric depth from an exported MoA-DepthCLIP ONNX model with NumPy, PIL and onnxruntime only: no PyTorch.

    from conversion.onnx_inference import OnnxDepthEstimator

    estimator = OnnxDepthEstimator("model.onnx")
    depth = estimator("room.png")          # float32 metres, (height, width) of the image
    depths = estimator([image_a, image_b])  # one batch, one depth map per image
    result = estimator.estimate("room.png")  # {"predicted_depth", "uncertainty" (a model with depth bins)}

or from the command line (prints each image's depth range):

    python -m conversion.onnx_inference model.onnx IMAGE...

`conversion.export_onnx` stores the image processor's settings (input size, resampling, mean and std) in the
ONNX file's metadata, so the `.onnx` file is all this needs. Preprocessing reproduces
`MoADepthCLIPImageProcessor` (EXIF orientation, alpha over white, antialiased resize of the float image, clamp,
CLIP normalisation) and the depth is resized back to each image's size with bilinear interpolation
(half-pixel centres, as `torch.nn.functional.interpolate(mode="bilinear")` does in the pipeline), so the result
matches `pipeline("depth-estimation")` to float rounding.

Sharing the CPU with other work (a server, a benchmark), pass `allow_spinning=False`: onnxruntime's idle threads
otherwise busy-wait after each run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
from PIL import Image, ImageOps


PREPROCESSING_METADATA_KEY = "moa_depthclip.preprocessing"
# PIL's antialiased filters are the ones torch's `antialias=True` interpolation reproduces
_PIL_RESAMPLE = {"bicubic": Image.Resampling.BICUBIC, "bilinear": Image.Resampling.BILINEAR}


def pil_to_float_rgb(image: Image.Image) -> np.ndarray:
    """Any PIL mode -> float32 RGB in [0, 1], `H x W x 3`, by the rule of the package's `to_float_rgb` (kept here
    without torch; `tests/test_image_entry_points.py` checks that both agree on every mode)."""
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode in ("I", "F"):
        gray = np.asarray(image, dtype=np.float32)
        low, high = (float(gray.min()), float(gray.max())) if gray.size else (0.0, 0.0)
        if image.mode.startswith("I;16"):
            scale = 65535.0
        elif image.mode == "F":
            if not np.isfinite(gray).all() or low < 0.0 or high > 255.0:
                raise ValueError(f"mode F image values must lie in [0, 1] (or [0, 255]), got [{low:.3g}, {high:.3g}]")
            scale = 1.0 if high <= 1.0 else 255.0
        else:
            if low < 0 or high > 65535:
                raise ValueError(f"mode I image values must lie in [0, 65535], got [{low:.0f}, {high:.0f}]")
            scale = 65535.0 if high > 255 else 255.0
        return np.repeat((gray / np.float32(scale))[..., None], 3, axis=-1)
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.asarray(image, dtype=np.float32) / np.float32(255.0)


def resize_bilinear(array: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of the last two axes, half-pixel centres, no antialiasing (torch `align_corners=False`)."""

    def taps(size_in, size_out):
        source = np.maximum((np.arange(size_out, dtype=np.float64) + 0.5) * (size_in / size_out) - 0.5, 0.0)
        low = np.minimum(np.floor(source).astype(np.int64), size_in - 1)
        high = np.minimum(low + 1, size_in - 1)
        return low, high, (source - low).astype(np.float32)

    top, bottom, wy = taps(array.shape[-2], height)
    left, right, wx = taps(array.shape[-1], width)
    rows = array[..., top, :] * (1 - wy)[:, None] + array[..., bottom, :] * wy[:, None]
    return rows[..., left] * (1 - wx) + rows[..., right] * wx


def _open_image(path) -> Image.Image:
    with Image.open(path) as image:
        image.load()
        return ImageOps.exif_transpose(image)


class OnnxDepthEstimator:
    """An exported MoA-DepthCLIP model in onnxruntime, with the image processor's pre- and postprocessing."""

    def __init__(self, path, providers=None, intra_op_num_threads: int | None = None, allow_spinning: bool = True):
        import onnxruntime

        options = onnxruntime.SessionOptions()
        if intra_op_num_threads:
            options.intra_op_num_threads = intra_op_num_threads
        if not allow_spinning:
            # onnxruntime's idle threads busy-wait after each run, taking the cores from whatever runs next
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = onnxruntime.InferenceSession(
            os.fspath(path), sess_options=options, providers=providers or ["CPUExecutionProvider"]
        )
        metadata = self.session.get_modelmeta().custom_metadata_map
        if PREPROCESSING_METADATA_KEY not in metadata:
            raise ValueError(
                f"{path}: no '{PREPROCESSING_METADATA_KEY}' metadata; export the model with conversion/export_onnx.py"
            )
        settings = json.loads(metadata[PREPROCESSING_METADATA_KEY])
        self.size = (int(settings["size"]["height"]), int(settings["size"]["width"]))
        self.do_resize = bool(settings["do_resize"])
        self.do_normalize = bool(settings["do_normalize"])
        self.mean = np.asarray(settings["image_mean"], dtype=np.float32).reshape(3, 1, 1)
        self.std = np.asarray(settings["image_std"], dtype=np.float32).reshape(3, 1, 1)
        if settings["resample"] not in _PIL_RESAMPLE:
            raise ValueError(
                f"resample={settings['resample']!r} has no exact PIL equivalent; "
                f"the torch-free path supports {sorted(_PIL_RESAMPLE)}"
            )
        self.resample = _PIL_RESAMPLE[settings["resample"]]
        self.input_name = self.session.get_inputs()[0].name
        names = [output.name for output in self.session.get_outputs()]
        # a model without depth bins (or a file exported before the uncertainty output) has the depth alone
        self.has_uncertainty = "depth_uncertainty" in names
        self.output_names = ["predicted_depth", "depth_uncertainty"] if self.has_uncertainty else names[:1]

    def preprocess(self, images) -> np.ndarray:
        """PIL images or paths -> `pixel_values` float32 `(batch, 3, height, width)`."""
        height, width = self.size
        batch = []
        for image in images:
            rgb = pil_to_float_rgb(image)
            if self.do_resize and rgb.shape[:2] != (height, width):
                channels = [
                    np.asarray(Image.fromarray(np.ascontiguousarray(rgb[..., c]), mode="F").resize(
                        (width, height), self.resample
                    ))
                    for c in range(3)
                ]
                rgb = np.clip(np.stack(channels, axis=-1), 0.0, 1.0)
            pixels = rgb.transpose(2, 0, 1)
            if self.do_normalize:
                pixels = (pixels - self.mean) / self.std
            batch.append(pixels)
        return np.ascontiguousarray(np.stack(batch), dtype=np.float32)

    def __call__(self, images):
        """One image (PIL image or path) -> depth `(H, W)` in metres; a list -> a list of depth maps."""
        single = not isinstance(images, (list, tuple))
        results = [result["predicted_depth"] for result in self.estimate(images if not single else [images])]
        return results[0] if single else results

    def estimate(self, images):
        """One image or a list -> a dict (a list of dicts) with `"predicted_depth"` and, where the file has it,
        `"uncertainty"`: float32 metres at each image's size, resized as the image processor's post-processing."""
        single = not isinstance(images, (list, tuple))
        images = [images] if single else list(images)
        images = [_open_image(image) if isinstance(image, (str, os.PathLike)) else image for image in images]
        # the maps come back at each image's size, as the pipeline returns them
        sizes = [image.size[::-1] for image in images]
        outputs = self.session.run(self.output_names, {self.input_name: self.preprocess(images)})
        keys = ["predicted_depth", "uncertainty"][: len(outputs)]
        results = [
            {
                key: m if m.shape == size else resize_bilinear(m, *size).astype(np.float32)
                for key, m in zip(keys, maps)
            }
            for size, maps in zip(sizes, zip(*outputs))
        ]
        return results[0] if single else results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Metric depth from an exported MoA-DepthCLIP ONNX model (no torch)")
    parser.add_argument("model", help="the .onnx file written by conversion/export_onnx.py")
    parser.add_argument("images", nargs="+", help="image files")
    args = parser.parse_args(argv)
    estimator = OnnxDepthEstimator(args.model)
    for path in args.images:
        result = estimator.estimate(path)
        depth = result["predicted_depth"]
        line = f"{path}: {depth.shape[1]}x{depth.shape[0]}, depth {depth.min():.3f} to {depth.max():.3f} m"
        if "uncertainty" in result:
            line += f", uncertainty {result['uncertainty'].min():.3f} to {result['uncertainty'].max():.3f} m"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
