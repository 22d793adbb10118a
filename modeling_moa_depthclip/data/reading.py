"""Reading RGB and depth files, and the one rule that turns stored depth values into metres.

The depth-unit rule (files, `datasets` columns, arrays and `.h5`/`.npy` data alike):

* `depth_unit` given (`"m"`, `"dm"`, `"cm"`, `"mm"` or `"densedepth8"`) or `depth_scale` given (stored units per
  metre): that unit, whatever the values' type;
* otherwise by the stored type: floating point is metres; 8-bit integers are DenseDepth's `nyu2_train` PNGs
  (`densedepth8`: 255 stands for DenseDepth's 10 m maximum); every other integer type is millimetres (the NYU,
  BTS and DenseDepth `nyu2_test` 16-bit PNGs).

A map whose largest valid value in metres lies outside `PLAUSIBLE_DEPTH_METRES` contradicts its unit (a 16-bit PNG
holding metres read as millimetres has a farthest pixel of a few centimetres) and raises a `DepthUnitWarning`
naming the file and the unit to pass instead.

Example dicts are `{"image": PIL.Image RGB, "depth": float32 [H, W] metres, 0 = invalid, "name": str}`. Pixels
become invalid when not finite, <= 0 or outside `[min_depth, max_depth]`; a bound of `None` does not clip, so the
depth range comes from the caller (the model's config), never from here.
"""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch
from PIL import Image

from ..image_processing_moa_depthclip import to_rgb8_image

__all__ = [
    "DEPTH_UNITS",
    "PLAUSIBLE_DEPTH_METRES",
    "DepthUnitWarning",
    "depth_scale_for",
    "depth_to_metres",
    "depth_unit_problem",
    "make_example",
    "read_depth_image",
    "read_rgb_image",
    "sanitize_depth",
    "to_rgb_image",
]

# Stored units per metre. DenseDepth's nyu2_train PNGs store depth / 10 m * 255 (its `maxDepth` of 1000 cm).
DEPTH_UNITS: dict[str, float] = {"m": 1.0, "dm": 1e1, "cm": 1e2, "mm": 1e3, "densedepth8": 25.5}

# A depth map whose farthest valid pixel is nearer than 2 cm or beyond 1 km is in another unit than assumed.
PLAUSIBLE_DEPTH_METRES = (0.02, 1000.0)


class DepthUnitWarning(UserWarning):
    """Stored depth values contradict the unit they are read in."""


def depth_scale_for(
    dtype: np.dtype, depth_unit: str | None = None, depth_scale: float | None = None
) -> tuple[float, str]:
    """Stored units per metre for values of `dtype`, and the unit's name, by the module's rule."""
    if depth_unit is not None and depth_scale is not None:
        if not np.isclose(DEPTH_UNITS.get(depth_unit, np.nan), depth_scale):
            raise ValueError(f"depth_unit={depth_unit!r} and depth_scale={depth_scale} disagree; pass one of them")
    if depth_unit is not None:
        if depth_unit not in DEPTH_UNITS:
            raise ValueError(f"unknown depth_unit {depth_unit!r}; expected one of {sorted(DEPTH_UNITS)}")
        return DEPTH_UNITS[depth_unit], depth_unit
    if depth_scale is not None:
        if not depth_scale > 0:
            raise ValueError(f"depth_scale must be positive (stored units per metre), got {depth_scale}")
        return float(depth_scale), f"1/{depth_scale:g} m"
    dtype = np.dtype(dtype)
    if np.issubdtype(dtype, np.floating):
        return DEPTH_UNITS["m"], "m"
    if dtype == np.uint8:
        return DEPTH_UNITS["densedepth8"], "densedepth8"
    if np.issubdtype(dtype, np.integer) or dtype == np.bool_:
        return DEPTH_UNITS["mm"], "mm"
    raise ValueError(f"cannot read depth values of type {dtype}")


def depth_unit_problem(metres: np.ndarray, unit: str, where: str) -> str | None:
    """A message if the valid values of `metres` (read as `unit`) are implausible as depths, else None."""
    with np.errstate(invalid="ignore"):
        valid = metres[np.isfinite(metres) & (metres > 0)]
    if valid.size == 0:
        return None
    farthest = float(valid.max())
    low, high = PLAUSIBLE_DEPTH_METRES
    if low <= farthest <= high:
        return None
    scale = DEPTH_UNITS.get(unit)
    stored = f"{farthest * scale:g}" if scale else "its values"
    if farthest < low:
        hint = "metres (depth_unit='m')" if unit in ("mm", "cm", "dm", "densedepth8") else "a larger unit"
        return (
            f"{where}: depth read as {unit!r} has its farthest valid pixel at {farthest:.4g} m (stored {stored}); "
            f"the values are probably {hint}"
        )
    return (
        f"{where}: depth read as {unit!r} has its farthest valid pixel at {farthest:.4g} m; "
        f"the values are probably millimetres (depth_unit='mm')"
    )


def depth_to_metres(
    raw: Any,
    depth_unit: str | None = None,
    depth_scale: float | None = None,
    *,
    where: str = "depth",
    warn: bool = True,
) -> np.ndarray:
    """Stored depth values (array, tensor or PIL image) -> float32 metres by the module's rule (not clipped).

    With `warn`, values that contradict the unit raise a `DepthUnitWarning` naming `where`.
    """
    if isinstance(raw, Image.Image):
        raw = np.array(raw)
    elif isinstance(raw, torch.Tensor):
        raw = raw.detach().cpu().numpy()
    raw = np.asarray(raw)
    if raw.dtype == object:
        raise ValueError(f"{where}: cannot interpret depth values of type {type(raw.flat[0]).__name__}")
    if raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    scale, unit = depth_scale_for(raw.dtype, depth_unit, depth_scale)
    metres = raw.astype(np.float32) / np.float32(scale)
    if warn:
        problem = depth_unit_problem(metres, unit, where)
        if problem:
            warnings.warn(problem, DepthUnitWarning, stacklevel=2)
    return metres


def sanitize_depth(depth: Any, min_depth: float | None = None, max_depth: float | None = None) -> np.ndarray:
    """Float32 copy of `depth` (metres) with invalid pixels set to 0.

    Invalid: not finite, <= 0, < `min_depth` or > `max_depth` (a bound of None does not clip).
    """
    if isinstance(depth, torch.Tensor):
        depth = depth.detach().cpu().numpy()
    out = np.array(depth, dtype=np.float32, copy=True)
    with np.errstate(invalid="ignore"):
        invalid = ~np.isfinite(out) | (out <= 0)
        if min_depth is not None:
            invalid |= out < min_depth
        if max_depth is not None:
            invalid |= out > max_depth
    out[invalid] = 0.0
    return out


def to_rgb_image(image: Any, what: str = "image") -> Image.Image:
    """An 8-bit RGB PIL image by the image processor's reading rule (`to_float_rgb`: 16-bit and float pictures
    scaled, alpha composited over white, EXIF orientation applied), so training and evaluation see a picture as
    the pipeline does. Accepts what the processor accepts (PIL images, arrays, tensors); errors name `what`."""
    if isinstance(image, (list, tuple)):
        image = np.asarray(image)
    if isinstance(image, np.ndarray) and image.dtype.kind in "iu" and image.dtype not in (np.uint8, np.uint16):
        # nested lists of a `datasets` column come back as int64: 8-bit values when they fit, else 16-bit
        high = int(image.max()) if image.size else 0
        if image.size and (image.min() < 0 or high > 65535):
            raise ValueError(f"{what}: integer pixel values must lie in [0, 65535], got [{image.min()}, {high}]")
        image = image.astype(np.uint8 if high <= 255 else np.uint16)
    try:
        return to_rgb8_image(image)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{what}: {error}") from None


def make_example(
    image: Any,
    depth_metres: Any,
    name: str,
    *,
    min_depth: float | None = None,
    max_depth: float | None = None,
    source: str | None = None,
) -> dict:
    """A checked example dict from an image and a depth map in metres; `source` names the data in errors."""
    rgb = to_rgb_image(image, what=source or name)
    depth = sanitize_depth(depth_metres, min_depth, max_depth)
    if depth.ndim == 3 and depth.shape[-1] == 1:
        depth = depth[..., 0]
    if depth.ndim != 2:
        raise ValueError(f"{source or name}: depth must be 2-D [H, W], got shape {depth.shape}")
    if depth.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"image/depth size mismatch for {source or name}: image is {rgb.width}x{rgb.height} (WxH), "
            f"depth is {depth.shape[1]}x{depth.shape[0]} (WxH)"
        )
    return {"image": rgb, "depth": depth, "name": str(name)}


def open_image(path: str | os.PathLike) -> Image.Image:
    """Open and load an image file, with one error naming the file if it is missing or unreadable."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        image = Image.open(path)
        image.load()
    except Exception as exc:  # PIL raises a zoo of exception types for corrupt files
        raise OSError(f"cannot read image file {path}: {exc}") from exc
    return image


def read_rgb_image(path: str | os.PathLike) -> Image.Image:
    """Read an image file as 8-bit RGB by `to_rgb_image`, with an error naming the file if it is missing or
    unreadable."""
    return to_rgb_image(open_image(path), what=os.fspath(path))


def depth_image_array(image: Image.Image, where: str) -> np.ndarray:
    """The stored values of a single-channel depth image (3 equal channels are accepted, as some tools save)."""
    raw = np.array(image)
    if raw.ndim == 3:
        if raw.shape[-1] in (3, 4) and np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 0], raw[..., 2]):
            raw = raw[..., 0]
        else:
            raise ValueError(f"depth image {where} has {raw.shape[-1]} different channels; expected one channel")
    return raw


def read_depth_image(
    path: str | os.PathLike, depth_unit: str | None = None, depth_scale: float | None = None
) -> np.ndarray:
    """Read a depth image file into float32 metres by the module's unit rule (not clipped)."""
    path = os.fspath(path)
    raw = depth_image_array(open_image(path), path)
    return depth_to_metres(raw, depth_unit, depth_scale, where=path)
