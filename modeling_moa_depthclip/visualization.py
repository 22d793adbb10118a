"""Depth maps as pictures, without a plotting library: the Turbo colour map as a polynomial fit."""

import math
from typing import Callable

import numpy as np
from PIL import Image, ImageDraw, ImageFont


# Polynomial fit of Google's Turbo colour map (A. Mikhailov, 2019; fit by R. Du), max error ~1/255.
_TURBO_POLY = np.array(
    [
        [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
        [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
        [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
    ],
    dtype=np.float64,
)


def _turbo_polynomial(x: np.ndarray) -> np.ndarray:
    powers = np.stack([np.ones_like(x), x, x**2, x**3, x**4, x**5], axis=-1)
    return (np.clip(powers @ _TURBO_POLY.T, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


# 4096 levels: finer than 8-bit colour can show, and indexing a table is ~10x faster than the polynomial per pixel
_TURBO_LEVELS = 4096
_TURBO_TABLE = _turbo_polynomial(np.linspace(0.0, 1.0, _TURBO_LEVELS))


def turbo(values: np.ndarray) -> np.ndarray:
    """Map values in [0, 1] (clipped; NaN as 0) to uint8 RGB with the Turbo colour map, shape `values.shape + (3,)`."""
    x = np.nan_to_num(np.asarray(values, dtype=np.float32), nan=0.0)
    index = np.clip(x * (_TURBO_LEVELS - 1) + 0.5, 0, _TURBO_LEVELS - 1).astype(np.intp)
    return _TURBO_TABLE[index]


def normalize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Scale depth to [0, 1] (float32) over [vmin, vmax] (the finite range of `depth` by default); NaN becomes 0.

    A constant map gives all zeros instead of dividing by zero; so does a map whose spread is only float rounding
    (bilinear resizing of a constant map), which would otherwise be stretched into noise.
    """
    depth = np.asarray(depth, dtype=np.float32)
    finite = np.isfinite(depth)
    has_finite = bool(finite.any())
    if vmin is None or vmax is None:
        valid = depth if finite.all() else depth[finite]
    low = vmin if vmin is not None else (float(valid.min()) if has_finite else 0.0)
    high = vmax if vmax is not None else (float(valid.max()) if has_finite else 1.0)
    span = high - low
    if not span > 1e-6 * max(abs(low), abs(high), 1.0):
        return np.zeros(depth.shape, dtype=np.float32)
    unit = (depth - np.float32(low)) * np.float32(1.0 / span)
    np.clip(unit, 0.0, 1.0, out=unit)
    return np.nan_to_num(unit, nan=0.0, copy=False)


def colorize_depth(depth: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Depth map as an RGB picture: near is red, far is blue (Turbo, reversed)."""
    return colorize_unit_depth(normalize_depth(depth, vmin, vmax))


def colorize_unit_depth(unit: np.ndarray) -> Image.Image:
    """RGB picture of depth already scaled to [0, 1] by `normalize_depth`."""
    return Image.fromarray(turbo(1.0 - unit), mode="RGB")


def grayscale_depth(depth: np.ndarray) -> Image.Image:
    """8-bit greyscale depth (the stock pipeline's `depth` image), safe for constant maps."""
    return grayscale_unit_depth(normalize_depth(depth))


def grayscale_unit_depth(unit: np.ndarray) -> Image.Image:
    return Image.fromarray((unit * 255.0 + 0.5).astype(np.uint8), mode="L")


def colorize_unit_uncertainty(unit: np.ndarray) -> Image.Image:
    """RGB picture of uncertainty already scaled to [0, 1]: confident is blue, uncertain is red (Turbo)."""
    return Image.fromarray(turbo(unit), mode="RGB")


def colorize_uncertainty(uncertainty: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """Uncertainty map (metres) as an RGB picture over [vmin, vmax] (default: `uncertainty_range`)."""
    if vmin is None or vmax is None:
        low, high = uncertainty_range(uncertainty)
        vmin = low if vmin is None else vmin
        vmax = high if vmax is None else vmax
    return colorize_unit_uncertainty(normalize_depth(uncertainty, vmin, vmax))


def uncertainty_range(uncertainty: np.ndarray) -> tuple[float, float]:
    """Colour range of an uncertainty map: from 0 m (no spread) to its largest finite value (at least 1 cm)."""
    finite = np.asarray(uncertainty, dtype=np.float32)
    finite = finite[np.isfinite(finite)]
    return 0.0, max(float(finite.max()) if finite.size else 0.0, 0.01)


def _nice_step(span: float, target_ticks: int = 6) -> float:
    raw = span / max(target_ticks, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    return next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)


def map_with_colour_bar(
    values: np.ndarray, vmin: float, vmax: float, colorize_unit: Callable[[np.ndarray], Image.Image], unit: str = "m"
) -> Image.Image:
    """A map coloured by `colorize_unit` (its own pixels, so clicks map to them) with a colour bar on its right,
    `vmax` at the top, ticks labelled in `unit`."""
    values = np.asarray(values, dtype=np.float32)
    height, width = values.shape
    coloured = colorize_unit(normalize_depth(values, vmin, vmax))
    font_size = max(12, height // 30)
    font = ImageFont.load_default(size=font_size)
    figure = Image.new("RGB", (width + int(font_size * 6), height), "white")
    figure.paste(coloured, (0, 0))
    draw = ImageDraw.Draw(figure)
    # the top is left free for the image toolbar a web page draws over the corner
    top, bottom = int(font_size * 2.5), height - font_size
    bar_left, bar_width = width + font_size, max(12, font_size)
    if bottom - top >= 2:
        gradient = np.linspace(1.0, 0.0, bottom - top, dtype=np.float32)[:, None].repeat(bar_width, axis=1)
        figure.paste(colorize_unit(gradient), (bar_left, top))
        draw.rectangle((bar_left - 1, top - 1, bar_left + bar_width, bottom), outline="black")
        step = _nice_step(vmax - vmin)
        digits = max(0, -math.floor(math.log10(step) + 1e-9)) if step < 1 else 0
        tick = math.ceil(vmin / step - 1e-9) * step
        while tick <= vmax + 1e-9:
            y = bottom - (tick - vmin) / (vmax - vmin) * (bottom - top)
            draw.line((bar_left + bar_width, y, bar_left + bar_width + 5, y), fill="black")
            draw.text((bar_left + bar_width + 8, y), f"{tick:.{digits}f} {unit}", fill="black", font=font, anchor="lm")
            tick += step
    return figure


def uncertainty_figure(uncertainty: np.ndarray, vmin: float | None = None, vmax: float | None = None) -> Image.Image:
    """The uncertainty map (confident blue, uncertain red) with a colour bar in metres."""
    low, high = uncertainty_range(uncertainty)
    return map_with_colour_bar(
        uncertainty, low if vmin is None else vmin, high if vmax is None else vmax, colorize_unit_uncertainty
    )


def plot_loss_curve(loss_history, path, eval_history=(), metric: str = "abs_rel", title: str = "MoA-DepthCLIP training"):
    """Training loss (raw and a running mean) against the step, with the eval `metric` on a second axis; a PNG.

    `loss_history` is `[[step, loss], ...]`, `eval_history` `[{"step", metric, ...}, ...]`. Returns the path, or None
    without any loss to plot.
    """
    if not loss_history:
        return None
    import matplotlib  # optional dependency: only pictures need it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = np.array([row[0] for row in loss_history])
    losses = np.array([row[1] for row in loss_history])
    fig, ax = plt.subplots(figsize=(8, 4.5), constrained_layout=True)
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, label="training loss")
    window = max(1, min(20, len(losses) // 10))
    if window > 1:
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        ax.plot(steps[window - 1:], smooth, color="tab:blue", label=f"training loss ({window}-step mean)")
    ax.set_xlabel("step")
    ax.set_ylabel("composite loss")
    ax.grid(alpha=0.3)
    handles, labels = ax.get_legend_handles_labels()
    if eval_history:
        twin = ax.twinx()
        twin.plot([e["step"] for e in eval_history], [e[metric] for e in eval_history],
                  "o-", color="tab:red", label=f"eval {metric}")
        twin.set_ylabel(f"eval {metric}", color="tab:red")
        more_handles, more_labels = twin.get_legend_handles_labels()
        handles, labels = handles + more_handles, labels + more_labels
    ax.legend(handles, labels, loc="upper right")
    ax.set_title(title)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
