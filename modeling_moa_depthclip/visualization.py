"""Depth maps as pictures, without a plotting library: the Turbo colour map as a polynomial fit."""

import numpy as np
from PIL import Image


# Polynomial fit of Google's Turbo colour map (A. Mikhailov, 2019; fit by R. Du), max error ~1/255.
_TURBO_POLY = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ],
    dtype=np.float64,
)


def turbo(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped) to uint8 RGB with the Turbo colour map; output shape `values.shape + (3,)`."""
    x = np.clip(np.asarray(values, dtype=np.float64), 0.0, 1.0)
    powers = np.stack([np.ones_like(x), x, x**2, x**3, x**4, x**5], axis=-1)
    rgb = np.clip(powers @ _TURBO_POLY.T, 0.0, 1.0)
    return (rgb * 255.0 + 0.5).astype(np.uint8)


def normalize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale depth to [0, 1] over [vmin, vmax] (the finite range of `depth` by default).

    A constant map gives all zeros instead of dividing by zero; so does a map whose spread is only float rounding
    (bilinear resizing of a constant map), which would otherwise be stretched into noise.
    """
    depth = np.asarray(depth, dtype=np.float64)
    finite = depth[np.isfinite(depth)]
    low = float(finite.min()) if vmin is None and finite.size else (vmin if vmin is not None else 0.0)
    high = float(finite.max()) if vmax is None and finite.size else (vmax if vmax is not None else 1.0)
    span = high - low
    if not span > 1e-6 * max(abs(low), abs(high), 1.0):
        return np.zeros_like(depth)
    return np.nan_to_num(np.clip((depth - low) / span, 0.0, 1.0), nan=0.0)


def colorize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Depth map as an RGB picture: near is red, far is blue (Turbo, reversed)."""
    return Image.fromarray(turbo(1.0 - normalize_depth(depth, vmin, vmax)), mode="RGB")


def grayscale_depth(depth: np.ndarray) -> Image.Image:
    """8-bit greyscale depth (the stock pipeline's `depth` image), safe for constant maps."""
    return Image.fromarray((normalize_depth(depth) * 255.0 + 0.5).astype(np.uint8), mode="L")
