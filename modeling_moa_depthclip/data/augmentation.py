"""Paired RGB-D augmentation and the training view and collation of depth examples."""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .reading import to_rgb_image

__all__ = ["DepthAugmentation", "DepthCollator", "TrainingExamples"]

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

    def apply(self, image: Any, depth: Any, params: Mapping[str, Any]) -> tuple[Image.Image, np.ndarray]:
        """Apply given parameters (from :meth:`sample_params`) to an image/depth pair."""
        image = to_rgb_image(image)
        depth = np.asarray(depth, dtype=np.float32)
        if depth.shape != (image.height, image.width):
            raise ValueError(
                f"image is {image.width}x{image.height} but depth is {depth.shape[1]}x{depth.shape[0]} (WxH)"
            )
        out_h, out_w = self.output_size or (image.height, image.width)
        coeffs = self.affine_coefficients((image.height, image.width), params)
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
    examples are kept in memory (worth it when producing them is slow, e.g. rendered scenes).
    """

    def __init__(self, base, augmentation: DepthAugmentation | None, seed: int, cache: bool = False):
        self.base, self.augmentation, self.seed = base, augmentation, seed
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
        image, depth = self.augmentation.apply(example["image"], example["depth"], params)
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
