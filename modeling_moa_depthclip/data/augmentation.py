"""Paired RGB-D augmentation and the training view and collation of depth examples."""

from __future__ import annotations

import math
import os
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .decoded_cache import DecodedFrames
from .reading import to_rgb_image

__all__ = ["DepthAugmentation", "DepthCollator", "TrainingExamples", "default_num_workers"]


def default_num_workers(cpu_count: int | None = None) -> int:
    """Data loader processes for training on this machine: none on 1-2 cores, where a worker would take the cores
    the training step runs on; otherwise half the cores, at most 8 (one worker makes a few hundred frames/s at
    224x224, BENCHMARKS.md)."""
    cores = cpu_count if cpu_count is not None else (len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                                     else os.cpu_count() or 1)
    return 0 if cores <= 2 else min(8, cores // 2)

_RGB_TO_YIQ = np.array([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=np.float32)
_YIQ_TO_RGB = np.linalg.inv(_RGB_TO_YIQ).astype(np.float32)


class DepthAugmentation:
    """Paired RGB-D augmentation: flip, scale + crop, small rotation, colour jitter.

    One affine map (output pixel -> input pixel) is sampled per call and used for both image
    (bilinear) and depth (nearest neighbour, so depth values are never blended across
    invalid pixels or object edges; pixels mapped from outside the frame become 0 = invalid).
    Depth values themselves are unchanged: zooming acts like a longer focal length and an
    in-plane rotation leaves z-depth invariant.

    Args:
        output_size: ``(height, width)`` of the output, or ``None`` to keep the input size. The
            input is scaled so the output is covered before the random zoom.
        hflip_prob: probability of a horizontal flip.
        scale_range: random zoom factor range (>= 1 zooms in).
        rotation_deg: maximum absolute rotation angle in degrees.
        color_jitter: ``(brightness, contrast, saturation, hue)`` strengths, or ``None``.
        gamma_range: optional ``(low, high)`` random gamma applied to the image.
        seed: seed of the ``numpy.random.Generator``; ``None`` draws fresh entropy. Inside a
            DataLoader worker the generator is re-seeded per worker so workers differ.
    """

    def __init__(
        self,
        output_size: tuple[int, int] | None = None,
        hflip_prob: float = 0.5,
        scale_range: tuple[float, float] = (1.0, 1.25),
        rotation_deg: float = 2.5,
        color_jitter: tuple[float, float, float, float] | None = (0.2, 0.2, 0.2, 0.05),
        gamma_range: tuple[float, float] | None = None,
        seed: int | None = None,
    ):
        if scale_range[0] <= 0 or scale_range[1] < scale_range[0]:
            raise ValueError(f"invalid scale_range {scale_range}")
        self.output_size = tuple(output_size) if output_size is not None else None
        self.hflip_prob, self.scale_range, self.rotation_deg = hflip_prob, tuple(scale_range), rotation_deg
        self.color_jitter, self.gamma_range, self.seed = color_jitter, gamma_range, seed
        self.rng = np.random.default_rng(seed)
        self._worker_id: int | None = None

    def _generator(self) -> np.random.Generator:
        # Forked workers inherit identical generator states; re-seed once per worker.
        info = torch.utils.data.get_worker_info()
        if info is not None and self._worker_id != info.id:
            entropy = [info.seed] if self.seed is None else [self.seed, info.seed]
            self.rng, self._worker_id = np.random.default_rng(entropy), info.id
        return self.rng

    def sample_params(self, rng: np.random.Generator | None = None) -> dict[str, Any]:
        """Draw one set of augmentation parameters (size independent; see :meth:`apply`).

        With `rng` the draw depends on that generator alone, e.g. one seeded per (seed, epoch, index), which makes
        a training run's data independent of how samples were spread over workers or where it was resumed.
        """
        rng = self._generator() if rng is None else rng
        brightness, contrast, saturation, hue = self.color_jitter or (0.0, 0.0, 0.0, 0.0)
        params = {
            "flip": bool(rng.random() < self.hflip_prob),
            "scale": float(rng.uniform(*self.scale_range)),
            "angle_deg": float(rng.uniform(-self.rotation_deg, self.rotation_deg)),
            # crop centre as a fraction of the free range, so it is valid for any image size
            "offset": (float(rng.random()), float(rng.random())),
            "brightness": float(rng.uniform(1 - brightness, 1 + brightness)),
            "contrast": float(rng.uniform(1 - contrast, 1 + contrast)),
            "saturation": float(rng.uniform(1 - saturation, 1 + saturation)),
            "hue": float(rng.uniform(-hue, hue)),
            "gamma": float(rng.uniform(*self.gamma_range)) if self.gamma_range else 1.0,
        }
        return params

    def affine_coefficients(self, input_size: tuple[int, int], params: Mapping[str, Any]) -> tuple[float, ...]:
        """PIL AFFINE coefficients mapping output pixel coordinates to input coordinates.

        ``input_size`` is ``(height, width)``. Coordinates are continuous with pixel ``i``
        covering ``[i, i + 1)``, the convention of ``PIL.Image.transform``.
        """
        in_h, in_w = input_size
        out_h, out_w = self.output_size or (in_h, in_w)
        zoom = max(out_h / in_h, out_w / in_w) * params["scale"]
        half_w, half_h = out_w / (2 * zoom), out_h / (2 * zoom)
        ox, oy = params["offset"]
        centre_in = np.array([half_w + ox * (in_w - 2 * half_w), half_h + oy * (in_h - 2 * half_h)])
        a = math.radians(params["angle_deg"])
        rotation = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
        flip = np.diag([-1.0, 1.0]) if params["flip"] else np.eye(2)
        flip_shift = np.array([out_w, 0.0]) if params["flip"] else np.zeros(2)
        # p_in = centre_in + R (F p_out + flip_shift - centre_out) / zoom
        matrix = rotation @ flip / zoom
        offset = centre_in + rotation @ (flip_shift - np.array([out_w / 2, out_h / 2])) / zoom
        return (matrix[0, 0], matrix[0, 1], offset[0], matrix[1, 0], matrix[1, 1], offset[1])

    def apply(
        self, image: Any, depth: Any, params: Mapping[str, Any], target_size: tuple[int, int] | None = None
    ) -> tuple[Image.Image, np.ndarray]:
        """Apply given parameters (from :meth:`sample_params`) to an image/depth pair.

        With `target_size` `(height, width)` the augmented frame (of `output_size`) comes out resized to it: the
        same geometry as augmenting and then resizing, but sampled once at the target size, with the colour jitter
        on the small image. That is several times cheaper when the model input is smaller than the frame (training
        at 224x224 on 640x480 NYU frames). The image is box-filtered first by the whole factor it shrinks by
        (`Image.reduce`), standing in for the antialiasing of the resize it replaces; the depth is sampled by
        nearest neighbour, as the collator's resize of the labels does.
        """
        image = to_rgb_image(image)
        depth = np.asarray(depth, dtype=np.float32)
        if depth.shape != (image.height, image.width):
            raise ValueError(
                f"image is {image.width}x{image.height} but depth is {depth.shape[1]}x{depth.shape[0]} (WxH)"
            )
        out_h, out_w = self.output_size or (image.height, image.width)
        coeffs = self.affine_coefficients((image.height, image.width), params)
        if target_size is not None and tuple(target_size) != (out_h, out_w):
            target_h, target_w = (int(v) for v in target_size)
            sx, sy = out_w / target_w, out_h / target_h
            # output pixel of the target grid -> output pixel of the full grid -> input pixel
            a, b, c, d, e, f = coeffs
            coeffs = (a * sx, b * sy, c, d * sx, e * sy, f)
            out_h, out_w = target_h, target_w
            a, b, c, d, e, f = coeffs
            # input pixels per target pixel along each output axis
            image = self._sample_image_reduced(image, coeffs, (out_w, out_h), math.hypot(a, d), math.hypot(b, e))
        else:
            image = image.transform(
                (out_w, out_h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR, fillcolor=(0, 0, 0)
            )
        depth_image = Image.fromarray(np.ascontiguousarray(depth))  # mode "F"
        depth = np.asarray(
            depth_image.transform(
                (out_w, out_h), Image.Transform.AFFINE, coeffs, resample=Image.Resampling.NEAREST, fillcolor=0.0
            ),
            dtype=np.float32,
        ).copy()
        return self._jitter(image, params), depth

    @staticmethod
    def _sample_image_reduced(image: Image.Image, coeffs, size, step_x: float, step_y: float) -> Image.Image:
        """Bilinear affine sampling at `size`, from the image box-reduced by the whole input-pixel step per output
        pixel along each axis (roughly `step_x`, `step_y`), so that the sampling does not alias."""
        factor_x, factor_y = max(1, int(step_x)), max(1, int(step_y))
        if (factor_x, factor_y) != (1, 1):
            image = image.reduce((factor_x, factor_y))
            a, b, c, d, e, f = coeffs
            # coordinates in the reduced image: input pixel / factor (pixel i covers [i, i + 1) in both)
            coeffs = (a / factor_x, b / factor_x, c / factor_x, d / factor_y, e / factor_y, f / factor_y)
        return image.transform(size, Image.Transform.AFFINE, coeffs, resample=Image.Resampling.BILINEAR,
                               fillcolor=(0, 0, 0))

    @staticmethod
    def _jitter(image: Image.Image, params: Mapping[str, Any]) -> Image.Image:
        keys = ("brightness", "contrast", "saturation", "hue", "gamma")
        if tuple(params[k] for k in keys) == (1, 1, 1, 0, 1):
            return image
        rgb = np.asarray(image, dtype=np.float32) / 255.0
        luma_weights = np.array([0.299, 0.587, 0.114], dtype=np.float32)
        rgb = rgb * params["brightness"]
        mean = float((rgb @ luma_weights).mean())
        rgb = (rgb - mean) * params["contrast"] + mean
        gray = (rgb @ luma_weights)[..., None]
        rgb = (rgb - gray) * params["saturation"] + gray
        if params["hue"] != 0.0:
            # Hue shift as a rotation of the chroma plane in YIQ space (keeps luma, no mode round trip).
            yiq = rgb @ _RGB_TO_YIQ.T
            a = 2.0 * math.pi * params["hue"]
            i, q = yiq[..., 1].copy(), yiq[..., 2].copy()
            yiq[..., 1], yiq[..., 2] = i * math.cos(a) - q * math.sin(a), i * math.sin(a) + q * math.cos(a)
            rgb = yiq @ _YIQ_TO_RGB.T
        rgb = np.clip(rgb, 0.0, 1.0)
        if params["gamma"] != 1.0:
            rgb = rgb ** params["gamma"]
        return Image.fromarray((rgb * 255.0 + 0.5).astype(np.uint8))

    def __call__(self, image: Any, depth: Any = None) -> Any:
        """Augment ``(image, depth)`` -> ``(image, depth)``, or an example dict -> new dict."""
        if isinstance(image, Mapping):
            example = dict(image)
            example["image"], example["depth"] = self.apply(example["image"], example["depth"], self.sample_params())
            return example
        if depth is None:
            raise ValueError("DepthAugmentation needs a depth map (or an example dict)")
        return self.apply(image, depth, self.sample_params())


class TrainingExamples(torch.utils.data.Dataset):
    """Training view of a map-style depth dataset: key `epoch * n + index` -> augmented example.

    Each example's augmentation is drawn from a generator seeded with `(seed, epoch, index)` only, so a run's data
    does not depend on how samples were spread over workers or where a run was resumed. With `cache`, decoded base
    examples are kept in memory (worth it when producing them is slow, e.g. rendered scenes). With `target_size`
    (the model input), augmented examples come out at that size (`DepthAugmentation.apply(..., target_size)`):
    the same augmentation, several times cheaper than augmenting the full frame for the collator to resize. With
    `decoded_cache` (a folder) the frames of a file dataset are decoded once and read back memory-mapped
    (`DecodedFrames`), the same examples bit for bit.
    """

    def __init__(
        self, base, augmentation: DepthAugmentation | None, seed: int, cache: bool = False,
        target_size: tuple[int, int] | None = None, decoded_cache: str | os.PathLike | None = None,
    ):
        if decoded_cache is not None:
            base = DecodedFrames(base, decoded_cache)
        self.base, self.augmentation, self.seed = base, augmentation, seed
        self.target_size = tuple(int(v) for v in target_size) if target_size is not None else None
        self.num_examples = len(base)
        self._cache: dict[int, dict] | None = {} if cache else None

    def __len__(self):
        return self.num_examples

    def _example(self, index: int) -> dict:
        if self._cache is None:
            return self.base[index]
        if index not in self._cache:
            self._cache[index] = self.base[index]
        return self._cache[index]

    def __getitem__(self, key: int) -> dict:
        epoch, index = divmod(int(key), self.num_examples)
        example = self._example(index)
        if self.augmentation is None:
            return example
        rng = np.random.default_rng([int(self.seed) & 0xFFFFFFFF, int(epoch), int(index)])
        params = self.augmentation.sample_params(rng)
        image, depth = self.augmentation.apply(example["image"], example["depth"], params, self.target_size)
        return {"image": image, "depth": depth, "name": example["name"]}


class DepthCollator:
    """Examples -> `{"pixel_values": (B, 3, H, W), "labels": (B, h, w) metres, 0 = invalid}`.

    Pixels come from the model's image processor at `input_size`; labels are resized to `input_size` with nearest
    neighbour (never blending depths across edges or invalid pixels), or kept at their native size.
    """

    def __init__(self, image_processor, input_size: tuple[int, int], labels_at_native_resolution: bool = False):
        self.image_processor, self.input_size = image_processor, tuple(int(s) for s in input_size)
        self.labels_at_native_resolution = labels_at_native_resolution

    def __call__(self, examples: list[dict]) -> dict:
        size = {"height": self.input_size[0], "width": self.input_size[1]}
        pixel_values = self.image_processor([e["image"] for e in examples], size=size, return_tensors="pt")["pixel_values"]
        depths = [torch.from_numpy(np.ascontiguousarray(e["depth"], dtype=np.float32)) for e in examples]
        if self.labels_at_native_resolution:
            shapes = {tuple(d.shape) for d in depths}
            if len(shapes) > 1:
                raise ValueError(
                    f"--labels_at_native_resolution needs equally sized depth maps in a batch, got {sorted(shapes)}"
                )
            labels = torch.stack(depths)
        else:
            labels = torch.stack([
                d if tuple(d.shape) == self.input_size
                else F.interpolate(d[None, None], size=self.input_size, mode="nearest")[0, 0]
                for d in depths
            ])
        return {"pixel_values": pixel_values, "labels": labels}
