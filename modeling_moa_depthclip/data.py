"""Data layer for metric depth: dataset sources, synthetic RGB-D scenes and augmentation.

Every source yields examples ``{"image": PIL.Image (RGB), "depth": float32 [H, W] metres,
"name": str}`` where 0.0 marks an invalid depth pixel. Sources:

* ``"synthetic"``: procedurally generated, ray-cast indoor rooms (no files needed);
* a local folder in the DenseDepth layout (CSV of ``rgb_path,depth_path``) or the BTS layout
  (``rgb depth focal`` filenames file with ``sync/`` / ``official_splits/test/`` folders);
* a Hugging Face Hub dataset id or a ``datasets.save_to_disk`` folder.
"""

from __future__ import annotations

import colorsys
import csv
import math
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, IterableDataset

from .point_cloud import NYU_INTRINSICS

__all__ = [
    "NYU_FOCAL",
    "NYU_HFOV_DEG",
    "DepthAugmentation",
    "DepthFileDataset",
    "HFDepthDataset",
    "HFIterableDepthDataset",
    "SyntheticDepthDataset",
    "camera_rays",
    "load_depth_dataset",
    "make_example",
    "read_depth_image",
    "read_rgb_image",
    "render_plane_depth",
    "render_room",
    "render_synthetic_scene",
    "sanitize_depth",
]

# Horizontal focal length of the NYU Depth V2 RGB camera at 640x480 (BTS/AdaBins round it to 518.8579).
NYU_FOCAL = NYU_INTRINSICS.fx
NYU_HFOV_DEG = math.degrees(2.0 * math.atan(320.0 / NYU_FOCAL))  # ~63.3 degrees

Example = dict  # {"image": PIL.Image, "depth": np.ndarray, "name": str}


# ---------------------------------------------------------------------------------------------
# Example construction and file reading
# ---------------------------------------------------------------------------------------------


def sanitize_depth(depth: Any, max_depth: float = 10.0) -> np.ndarray:
    """Float32 copy of ``depth`` with invalid values (<= 0, NaN, inf, > max_depth) set to 0."""
    if isinstance(depth, torch.Tensor):
        depth = depth.detach().cpu().numpy()
    out = np.array(depth, dtype=np.float32, copy=True)
    with np.errstate(invalid="ignore"):
        invalid = ~np.isfinite(out) | (out <= 0) | (out > max_depth)
    out[invalid] = 0.0
    return out


def _to_rgb_image(image: Any, what: str = "image") -> Image.Image:
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    if isinstance(image, torch.Tensor):
        image = image.detach().cpu().numpy()
    array = np.asarray(image)
    if array.ndim == 2:
        array = np.stack([array] * 3, axis=-1)
    if array.ndim != 3 or array.shape[-1] not in (3, 4):
        raise ValueError(f"{what}: expected an RGB image [H, W, 3], got array of shape {array.shape}")
    if array.dtype != np.uint8:
        # Float images are assumed to be in [0, 1].
        scale = 255.0 if np.issubdtype(array.dtype, np.floating) else 1.0
        array = np.clip(array.astype(np.float32) * scale + (0.5 if scale > 1 else 0.0), 0, 255).astype(np.uint8)
    return Image.fromarray(np.ascontiguousarray(array[..., :3])).convert("RGB")


def make_example(image: Any, depth: Any, name: str, *, max_depth: float = 10.0, source: str | None = None) -> Example:
    """Build a checked example dict; ``source`` (e.g. the file pair) is used in error messages."""
    rgb = _to_rgb_image(image, what=source or name)
    depth_m = sanitize_depth(depth, max_depth)
    if depth_m.ndim == 3 and depth_m.shape[-1] == 1:
        depth_m = depth_m[..., 0]
    if depth_m.ndim != 2:
        raise ValueError(f"{source or name}: depth must be 2-D [H, W], got shape {depth_m.shape}")
    if depth_m.shape != (rgb.height, rgb.width):
        raise ValueError(
            f"image/depth size mismatch for {source or name}: image is {rgb.width}x{rgb.height} (WxH), "
            f"depth is {depth_m.shape[1]}x{depth_m.shape[0]} (WxH)"
        )
    return {"image": rgb, "depth": depth_m, "name": name}


def _open_image(path: str | os.PathLike) -> Image.Image:
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
    """Read an image file as RGB, with an error naming the file if it is missing/unreadable."""
    return _open_image(path).convert("RGB")


def _depth_array_to_metres(raw: np.ndarray, depth_scale: float | None) -> np.ndarray:
    """Apply ``depth_scale`` (raw units per metre) or guess it from the dtype and range."""
    if raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if depth_scale is None:
        if np.issubdtype(raw.dtype, np.integer) or raw.dtype == np.bool_:
            # Integer depth is millimetres in every common NYU export; a max <= 100 can only be metres.
            finite_max = float(raw.max()) if raw.size else 0.0
            depth_scale = 1000.0 if finite_max > 100 else 1.0
        else:
            depth_scale = 1.0
    return raw.astype(np.float32) / np.float32(depth_scale)


def read_depth_image(path: str | os.PathLike, depth_scale: float | None = None) -> np.ndarray:
    """Read a depth image file into float32 metres (not sanitised).

    ``depth_scale`` is raw units per metre. Default: 16/32-bit integer PNGs are millimetres
    (1000), 8-bit PNGs follow the DenseDepth NYU train convention (255 = 10 m, scale 25.5),
    float images are metres.
    """
    image = _open_image(path)
    raw = np.array(image)
    if depth_scale is None:
        if raw.dtype == np.uint8:
            depth_scale = 25.5
        elif np.issubdtype(raw.dtype, np.integer):
            depth_scale = 1000.0
        else:
            depth_scale = 1.0
    if raw.ndim == 3:
        # Some tools save depth as 3 identical 8-bit channels.
        if raw.shape[-1] in (3, 4) and np.array_equal(raw[..., 0], raw[..., 1]):
            raw = raw[..., 0]
        else:
            raise ValueError(f"depth image {path} has {raw.shape[-1]} channels; expected a single-channel image")
    return raw.astype(np.float32) / np.float32(depth_scale)


# ---------------------------------------------------------------------------------------------
# Synthetic scenes: vectorised ray casting of a textured, shaded box room
# ---------------------------------------------------------------------------------------------


def camera_rays(height: int, width: int, fov_deg: float = NYU_HFOV_DEG) -> np.ndarray:
    """Pinhole ray directions through pixel centres, camera frame (x right, y down, z forward).

    Returns float64 [H, W, 3] with z == 1, so a hit at ray parameter ``t`` has z-depth ``t``.
    ``fov_deg`` is the horizontal field of view; pixels are square, principal point centred.
    """
    focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2.0)
    x = (np.arange(width, dtype=np.float64) + 0.5 - width / 2.0) / focal
    y = (np.arange(height, dtype=np.float64) + 0.5 - height / 2.0) / focal
    xx, yy = np.meshgrid(x, y)
    return np.stack([xx, yy, np.ones_like(xx)], axis=-1)


def render_plane_depth(
    height: int, width: int, distance: float, *, tilt_deg: float = 0.0, fov_deg: float = NYU_HFOV_DEG
) -> np.ndarray:
    """Z-depth [H, W] (float32) of a plane through (0, 0, distance) tilted about the camera x axis.

    ``tilt_deg=0`` is fronto-parallel (depth == distance everywhere). With tilt ``a`` the plane
    normal is (0, sin a, cos a) and depth = distance / (1 + y_n tan a), y_n the normalised image
    row coordinate. Rays that never hit the plane in front of the camera get 0 (invalid).
    """
    rays = camera_rays(height, width, fov_deg)
    a = math.radians(tilt_deg)
    normal = np.array([0.0, math.sin(a), math.cos(a)])
    denom = rays @ normal
    with np.errstate(divide="ignore", invalid="ignore"):
        t = (distance * normal[2]) / denom
    t[~np.isfinite(t) | (t <= 0)] = 0.0
    return t.astype(np.float32)


def _hash01(ix: np.ndarray, iy: np.ndarray, seed: np.ndarray | int) -> np.ndarray:
    """Deterministic per-lattice-point random values in [0, 1) (integer hash, no RNG state)."""
    h = (ix * 374761393 + iy * 668265263 + np.asarray(seed, dtype=np.int64) * 1442695041) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * 1274126177) & 0xFFFFFFFF
    h ^= h >> 16
    return h.astype(np.float64) / 4294967296.0


def _value_noise(u: np.ndarray, v: np.ndarray, seed: np.ndarray | int) -> np.ndarray:
    """Smooth 2-D value noise in [0, 1): hashed lattice values, smoothstep-interpolated."""
    iu, iv = np.floor(u), np.floor(v)
    fu, fv = u - iu, v - iv
    iu, iv = iu.astype(np.int64), iv.astype(np.int64)
    su, sv = fu * fu * (3 - 2 * fu), fv * fv * (3 - 2 * fv)
    n00, n10 = _hash01(iu, iv, seed), _hash01(iu + 1, iv, seed)
    n01, n11 = _hash01(iu, iv + 1, seed), _hash01(iu + 1, iv + 1, seed)
    return (n00 * (1 - su) + n10 * su) * (1 - sv) + (n01 * (1 - su) + n11 * su) * sv


def _fractal_noise(u: np.ndarray, v: np.ndarray, seed: np.ndarray | int, octaves: int = 3) -> np.ndarray:
    total, amplitude, norm = np.zeros_like(u), 1.0, 0.0
    for octave in range(octaves):
        total += amplitude * _value_noise(u * 2**octave, v * 2**octave, np.asarray(seed) + 7919 * octave)
        norm += amplitude
        amplitude *= 0.5
    return total / norm


# Texture kinds: tiles for floors, plaster-like noise for walls, wood-like stripes for furniture.
_CHECKER, _NOISE, _STRIPES = 0, 1, 2


def _make_materials(rng: np.random.Generator, num_boxes: int) -> dict[str, np.ndarray]:
    """Random materials for the 6 room faces (x-, x+, floor, ceiling, z-, z+) and the boxes."""
    colours, kinds, scales, contrasts = [], [], [], []
    wall_hue, wall_sat = rng.uniform(0, 1), rng.uniform(0.05, 0.3)
    for surface in range(6 + num_boxes):
        if surface == 2:  # floor
            hue, sat, val = rng.uniform(0.02, 0.12), rng.uniform(0.2, 0.6), rng.uniform(0.3, 0.7)
            kind = int(rng.choice([_CHECKER, _STRIPES]))
        elif surface == 3:  # ceiling
            hue, sat, val = wall_hue, wall_sat * 0.3, rng.uniform(0.8, 0.95)
            kind = _NOISE
        elif surface < 6:  # walls share a paint colour with small per-wall variation
            hue, sat, val = wall_hue + rng.uniform(-0.03, 0.03), wall_sat, rng.uniform(0.6, 0.9)
            kind = int(rng.choice([_NOISE, _NOISE, _CHECKER]))
        else:  # furniture
            hue, sat, val = rng.uniform(0, 1), rng.uniform(0.2, 0.8), rng.uniform(0.3, 0.9)
            kind = int(rng.choice([_CHECKER, _NOISE, _STRIPES]))
        colours.append(colorsys.hsv_to_rgb(hue % 1.0, sat, val))
        kinds.append(kind)
        scales.append(rng.uniform(0.15, 0.6))
        contrasts.append(rng.uniform(0.15, 0.45))
    return {
        "colour": np.asarray(colours),
        "kind": np.asarray(kinds),
        "scale": np.asarray(scales),
        "contrast": np.asarray(contrasts),
        "seed": rng.integers(0, 2**20, size=6 + num_boxes),
    }


def _slab_intersect(origins: Sequence[Any], dirs: Sequence[np.ndarray], lo: np.ndarray, hi: np.ndarray):
    """Ray/axis-aligned-box intersection (slab method) on per-axis component arrays.

    Returns ``(t_near, t_far, near_axis)``; the ray hits the box iff ``t_near <= t_far``.
    """
    t_near = t_far = near_axis = None
    for a in range(3):
        inv = 1.0 / np.where(np.abs(dirs[a]) < 1e-12, 1e-12, dirs[a])
        t1, t2 = (lo[a] - origins[a]) * inv, (hi[a] - origins[a]) * inv
        t_min, t_max = np.minimum(t1, t2), np.maximum(t1, t2)
        if t_near is None:
            t_near, t_far, near_axis = t_min, t_max, np.zeros(t_min.shape, dtype=np.int64)
        else:
            near_axis = np.where(t_min > t_near, a, near_axis)
            t_near, t_far = np.maximum(t_near, t_min), np.minimum(t_far, t_max)
    return t_near, t_far, near_axis


def _camera_basis(yaw_deg: float, pitch_deg: float) -> np.ndarray:
    """Rows: camera right, down, forward in world coordinates (world y is up)."""
    yaw, pitch = math.radians(yaw_deg), math.radians(pitch_deg)
    forward = np.array([math.sin(yaw) * math.cos(pitch), math.sin(pitch), math.cos(yaw) * math.cos(pitch)])
    right = np.cross([0.0, 1.0, 0.0], forward)
    right /= np.linalg.norm(right)
    down = np.cross(right, forward)
    return np.stack([right, down, forward])


def render_room(
    height: int,
    width: int,
    *,
    room_size: Sequence[float],
    camera_position: Sequence[float],
    yaw_deg: float = 0.0,
    pitch_deg: float = 0.0,
    boxes: Sequence[tuple[Sequence[float], Sequence[float]]] = (),
    light_position: Sequence[float] | None = None,
    fov_deg: float = NYU_HFOV_DEG,
    texture_seed: int = 0,
    ambient: float = 0.35,
    noise_std: float = 0.01,
) -> tuple[np.ndarray, np.ndarray]:
    """Ray-cast a box-shaped room with axis-aligned boxes inside it.

    World frame: the room spans ``[0, W] x [0, H] x [0, D]`` (``room_size = (W, H, D)``) with y
    up (floor at y = 0). The camera at ``camera_position`` looks along yaw (about +y, 0 = +z) and
    pitch (positive = up). ``boxes`` are ``(min_xyz, max_xyz)`` pairs. Surfaces get procedural
    textures (from ``texture_seed``) and Lambertian shading from a point light with hard shadows
    cast by the boxes, plus ambient light.

    Returns ``(rgb uint8 [H, W, 3], depth float32 [H, W])`` where depth is the exact z-depth
    (distance along the optical axis, the NYU convention).
    """
    room = np.asarray(room_size, dtype=np.float64)
    origin = np.asarray(camera_position, dtype=np.float64)
    if np.any(origin <= 0) or np.any(origin >= room):
        raise ValueError(f"camera position {tuple(origin)} is not inside the room {tuple(room)}")
    boxes_arr = [(np.asarray(lo, np.float64), np.asarray(hi, np.float64)) for lo, hi in boxes]

    # Camera-frame rays have z == 1 and the basis is orthonormal, so the ray parameter is z-depth.
    rays_cam = camera_rays(height, width, fov_deg).reshape(-1, 3)
    dirs = rays_cam @ _camera_basis(yaw_deg, pitch_deg)
    n = dirs.shape[0]

    # The camera is inside the room, so every ray leaves it through the nearest "exit" face.
    with np.errstate(divide="ignore"):
        bound = np.where(dirs > 0, room, 0.0)
        t_faces = np.where(dirs != 0, (bound - origin) / np.where(dirs != 0, dirs, 1.0), np.inf)
    axis = t_faces.argmin(axis=1)
    t_hit = t_faces[np.arange(n), axis]
    surface = 2 * axis + (dirs[np.arange(n), axis] > 0)  # 0:x-, 1:x+, 2:floor, 3:ceiling, 4:z-, 5:z+

    dir_xyz = [dirs[:, 0], dirs[:, 1], dirs[:, 2]]
    for k, (lo, hi) in enumerate(boxes_arr):
        t_near, t_far, near_axis = _slab_intersect(origin, dir_xyz, lo, hi)
        hit = (t_near <= t_far) & (t_near > 1e-9) & (t_near < t_hit)
        t_hit = np.where(hit, t_near, t_hit)
        axis = np.where(hit, near_axis, axis)
        surface = np.where(hit, 6 + k, surface)

    rows = np.arange(n)
    points = origin + t_hit[:, None] * dirs
    normals = np.zeros((n, 3))
    normals[rows, axis] = -np.sign(dirs[rows, axis])  # faces always point towards the camera

    # Texture coordinates: the two world coordinates spanning the hit face.
    u = points[rows, (axis + 1) % 3]
    v = points[rows, (axis + 2) % 3]
    materials = _make_materials(np.random.default_rng(texture_seed), len(boxes_arr))
    scale = materials["scale"][surface]
    su, sv, seed = u / scale, v / scale, materials["seed"][surface]
    kind = materials["kind"][surface]
    pattern = np.empty(n)
    for kind_id in (_CHECKER, _NOISE, _STRIPES):
        m = kind == kind_id
        if not m.any():
            continue
        fine = _value_noise(su[m] * 8, sv[m] * 8, seed[m])  # grain so no surface is perfectly flat
        if kind_id == _CHECKER:
            tiles = (np.floor(su[m]) + np.floor(sv[m])) % 2
            pattern[m] = 0.75 * tiles + 0.25 * fine
        elif kind_id == _NOISE:
            pattern[m] = 0.8 * _fractal_noise(su[m], sv[m], seed[m]) + 0.2 * fine
        else:
            warp = _fractal_noise(su[m] * 0.5, sv[m] * 2.0, seed[m], octaves=2)
            pattern[m] = 0.5 + 0.5 * np.sin(2 * np.pi * (su[m] * 1.5 + 2.0 * warp))
    albedo = materials["colour"][surface] * (1.0 - materials["contrast"][surface] * pattern)[:, None]

    # Lambertian point light with inverse-square-like falloff (softened to avoid hot spots).
    if light_position is None:
        light_position = (room[0] / 2, room[1] - 0.05, room[2] / 2)
    light = np.asarray(light_position, dtype=np.float64)
    to_light = light - points
    dist = np.linalg.norm(to_light, axis=1)
    lambert = np.clip(np.einsum("ij,ij->i", normals, to_light) / np.maximum(dist, 1e-9), 0.0, None)
    diffuse = lambert * 1.6 / (1.0 + (dist / 3.0) ** 2)
    if boxes_arr:
        shadow_origins = points + 1e-6 * normals
        shadow_o = [shadow_origins[:, 0], shadow_origins[:, 1], shadow_origins[:, 2]]
        shadow_d = [to_light[:, 0], to_light[:, 1], to_light[:, 2]]
        lit = np.ones(n, dtype=bool)
        for lo, hi in boxes_arr:
            t_near, t_far, _ = _slab_intersect(shadow_o, shadow_d, lo, hi)
            lit &= ~((t_near <= t_far) & (t_far > 1e-9) & (t_near < 1.0))
        diffuse = np.where(lit, diffuse, 0.15 * diffuse)
    radiance = albedo * (ambient + diffuse)[:, None]
    if noise_std > 0:
        radiance = radiance + np.random.default_rng(texture_seed + 1).normal(0.0, noise_std, radiance.shape)
    rgb = (np.clip(radiance, 0.0, 1.0) ** (1 / 2.2) * 255.0 + 0.5).astype(np.uint8)
    return rgb.reshape(height, width, 3), t_hit.reshape(height, width).astype(np.float32)


def render_synthetic_scene(
    seed: int | Sequence[int], height: int = 480, width: int = 640, fov_deg: float = NYU_HFOV_DEG
) -> tuple[np.ndarray, np.ndarray]:
    """Render a random indoor room (floor, walls, ceiling, 1-4 boxes) deterministically from ``seed``.

    Room sizes are chosen so depth is mostly within 0.5-10 m (like NYU); the camera stands
    1-1.8 m high, faces roughly the room centre and looks slightly down, and never stands
    inside furniture. Returns ``(rgb uint8 [H, W, 3], depth float32 [H, W] metres)``.
    """
    rng = np.random.default_rng(seed)
    room = np.array([rng.uniform(3.0, 7.0), rng.uniform(2.4, 3.2), rng.uniform(3.5, 8.5)])
    boxes = []
    for _ in range(int(rng.integers(1, 5))):
        size = np.array([rng.uniform(0.4, 1.6), rng.uniform(0.3, 1.8), rng.uniform(0.4, 1.6)])
        size[[0, 2]] = np.minimum(size[[0, 2]], room[[0, 2]] / 2)
        lo = np.array([rng.uniform(0.05, room[0] - size[0] - 0.05), 0.0, rng.uniform(0.05, room[2] - size[2] - 0.05)])
        boxes.append((lo, lo + size))

    camera = None
    for _ in range(100):
        # Stand in the back third of the room (like a photographer) so the view spans the room.
        z = rng.uniform(0.4, 0.35 * room[2])
        z = z if rng.random() < 0.5 else room[2] - z
        candidate = np.array([rng.uniform(0.4, room[0] - 0.4), rng.uniform(1.0, 1.8), z])
        clear = all(
            not (lo[0] - 0.5 < candidate[0] < hi[0] + 0.5 and lo[2] - 0.5 < candidate[2] < hi[2] + 0.5)
            for lo, hi in boxes
        )
        if clear:
            camera = candidate
            break
    if camera is None:  # cluttered room: drop the furniture rather than fail
        boxes, camera = [], candidate
    # Facing the centre keeps the nearest wall at a realistic distance.
    yaw_to_centre = math.degrees(math.atan2(room[0] / 2 - camera[0], room[2] / 2 - camera[2]))
    yaw = yaw_to_centre + rng.uniform(-45.0, 45.0)
    pitch = rng.uniform(-20.0, 5.0)
    light = (rng.uniform(0.2, 0.8) * room[0], room[1] - 0.05, rng.uniform(0.2, 0.8) * room[2])
    return render_room(
        height,
        width,
        room_size=room,
        camera_position=camera,
        yaw_deg=yaw,
        pitch_deg=pitch,
        boxes=boxes,
        light_position=light,
        fov_deg=fov_deg,
        texture_seed=int(rng.integers(0, 2**31 - 1)),
    )


# ---------------------------------------------------------------------------------------------
# Datasets
# ---------------------------------------------------------------------------------------------


class _TransformMixin:
    transform: Callable[[Example], Example] | None

    def _finish(self, example: Example) -> Example:
        return self.transform(example) if self.transform is not None else example


class SyntheticDepthDataset(_TransformMixin, Dataset):
    """Map-style dataset of synthetic rooms rendered on the fly (scene ``i`` uses seed ``(seed, split_code, i)``)."""

    def __init__(
        self,
        num_samples: int,
        *,
        seed: int = 0,
        split_code: int = 0,
        height: int = 480,
        width: int = 640,
        max_depth: float = 10.0,
        name_prefix: str = "synthetic",
        transform: Callable[[Example], Example] | None = None,
    ):
        if num_samples <= 0:
            raise ValueError(f"synthetic dataset needs num_samples > 0, got {num_samples}")
        self.num_samples, self.seed, self.split_code = num_samples, seed, split_code
        self.height, self.width, self.max_depth = height, width, max_depth
        self.name_prefix, self.transform = name_prefix, transform

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> Example:
        if not 0 <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for {self.num_samples} synthetic scenes")
        rgb, depth = render_synthetic_scene((self.seed, self.split_code, index), self.height, self.width)
        name = f"{self.name_prefix}_{index:05d}"
        return self._finish(make_example(rgb, depth, name, max_depth=self.max_depth))


class DepthFileDataset(_TransformMixin, Dataset):
    """Map-style dataset over (rgb file, depth file) pairs, e.g. from a DenseDepth CSV or BTS list."""

    def __init__(
        self,
        pairs: Sequence[tuple[str, str]],
        names: Sequence[str] | None = None,
        *,
        depth_scale: float | None = None,
        max_depth: float = 10.0,
        transform: Callable[[Example], Example] | None = None,
    ):
        self.pairs = [(os.fspath(a), os.fspath(b)) for a, b in pairs]
        self.names = list(names) if names is not None else [Path(a).stem for a, _ in self.pairs]
        if len(self.names) != len(self.pairs):
            raise ValueError(f"got {len(self.names)} names for {len(self.pairs)} file pairs")
        self.depth_scale, self.max_depth, self.transform = depth_scale, max_depth, transform

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Example:
        rgb_path, depth_path = self.pairs[index]
        image = read_rgb_image(rgb_path)
        depth = read_depth_image(depth_path, self.depth_scale)
        example = make_example(
            image, depth, self.names[index], max_depth=self.max_depth, source=f"pair ({rgb_path}, {depth_path})"
        )
        return self._finish(example)


_IMAGE_COLUMNS = ("image", "rgb", "img", "color", "colors", "rgb_image")
_DEPTH_COLUMNS = ("depth_map", "depth", "depth_gt", "gt_depth", "depth_image")
_NAME_COLUMNS = ("name", "file_name", "filename", "id", "image_id")


def _pick_column(
    columns: Sequence[str], requested: str | None, candidates: Sequence[str], what: str, source: str
) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{what} column {requested!r} not in dataset {source} (columns: {list(columns)})")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"cannot find a {what} column in dataset {source} (columns: {list(columns)}; tried {list(candidates)}); "
        f"pass {what}_column="
    )


def _decode_depth_value(value: Any, depth_scale: float | None, where: str) -> np.ndarray:
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):  # undecoded Image feature
        import io

        value = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
    if isinstance(value, Image.Image):
        raw = np.array(value)
    elif isinstance(value, torch.Tensor):
        raw = value.detach().cpu().numpy()
    else:
        raw = np.asarray(value)
    if raw.dtype == object or raw.ndim not in (2, 3):
        raise ValueError(f"{where}: cannot interpret depth value of type {type(value).__name__} with shape {raw.shape}")
    return _depth_array_to_metres(raw, depth_scale)


def _hf_example(row: Mapping[str, Any], index: int, cfg: dict) -> Example:
    where = f"{cfg['source']}[{index}]"
    name = str(row[cfg["name_column"]]) if cfg["name_column"] else f"{cfg['split']}_{index:06d}"
    image = row[cfg["image_column"]]
    if isinstance(image, Mapping) and ("bytes" in image or "path" in image):
        import io

        image = Image.open(io.BytesIO(image["bytes"]) if image.get("bytes") else image["path"])
    depth = _decode_depth_value(row[cfg["depth_column"]], cfg["depth_scale"], where)
    return make_example(image, depth, name, max_depth=cfg["max_depth"], source=where)


def _hf_columns_config(columns, image_column, depth_column, **settings) -> dict:
    """Which columns hold image, depth and name (given or detected), with the decoding settings."""
    source = settings["source"]
    return dict(
        image_column=_pick_column(columns, image_column, _IMAGE_COLUMNS, "image", source),
        depth_column=_pick_column(columns, depth_column, _DEPTH_COLUMNS, "depth", source),
        name_column=next((c for c in _NAME_COLUMNS if c in columns), None),
        **settings,
    )


class HFDepthDataset(_TransformMixin, Dataset):
    """Map-style view of a ``datasets.Dataset`` as depth examples (columns auto-detected)."""

    def __init__(
        self,
        hf_dataset: Any,
        *,
        image_column: str | None = None,
        depth_column: str | None = None,
        depth_scale: float | None = None,
        max_depth: float = 10.0,
        source: str = "dataset",
        split: str = "train",
        transform: Callable[[Example], Example] | None = None,
    ):
        self.hf_dataset, self.transform = hf_dataset, transform
        self._cfg = _hf_columns_config(
            list(hf_dataset.column_names), image_column, depth_column,
            source=source, split=split, depth_scale=depth_scale, max_depth=max_depth,
        )

    def __len__(self) -> int:
        return len(self.hf_dataset)

    def __getitem__(self, index: int) -> Example:
        return self._finish(_hf_example(self.hf_dataset[int(index)], int(index), self._cfg))


class HFIterableDepthDataset(_TransformMixin, IterableDataset):
    """Iterable view of a streaming ``datasets.IterableDataset`` as depth examples."""

    def __init__(
        self,
        hf_dataset: Any,
        *,
        image_column: str | None = None,
        depth_column: str | None = None,
        depth_scale: float | None = None,
        max_depth: float = 10.0,
        source: str = "dataset",
        split: str = "train",
        transform: Callable[[Example], Example] | None = None,
    ):
        columns = list(hf_dataset.column_names or [])
        if not columns:  # streaming datasets may not know their schema until the first row
            columns = list(next(iter(hf_dataset)).keys())
        self.hf_dataset, self.transform = hf_dataset, transform
        self._cfg = _hf_columns_config(
            columns, image_column, depth_column,
            source=source, split=split, depth_scale=depth_scale, max_depth=max_depth,
        )

    def __iter__(self) -> Iterator[Example]:
        for index, row in enumerate(self.hf_dataset):
            yield self._finish(_hf_example(row, index, self._cfg))


# --- local folder layouts --------------------------------------------------------------------

_SPLIT_CODES = {"train": 0, "validation": 1, "val": 1, "test": 2}
_TEST_SPLITS = ("test", "validation", "val", "eval")


def _is_image_path(text: str) -> bool:
    return bool(re.search(r"\.(png|jpe?g|tiff?|bmp|npy)$", text.strip(), re.IGNORECASE))


def _find_csv(folder: Path, split: str) -> Path | None:
    preferred = ["nyu2_test.csv", "index.csv"] if split in _TEST_SPLITS else ["nyu2_train.csv", "index.csv"]
    for base in (folder, folder / "data"):
        for name in preferred:
            if (base / name).is_file():
                return base / name
    csvs = sorted(folder.glob("*.csv")) or sorted((folder / "data").glob("*.csv"))
    if len(csvs) == 1:
        return csvs[0]
    if len(csvs) > 1:
        raise ValueError(
            f"folder {folder} has several CSV files ({', '.join(p.name for p in csvs)}); pass the CSV file itself"
        )
    return None


def _resolve_relative(rel: str, bases: Sequence[Path]) -> Path:
    rel = rel.strip().lstrip("/")
    for base in bases:
        candidate = base / rel
        if candidate.is_file():
            return candidate
    return bases[0] / rel


def _densedepth_pairs(csv_path: Path, data_root: Path | None) -> tuple[list[tuple[str, str]], list[str]]:
    # DenseDepth's own CSVs list paths like "data/nyu2_train/...", relative to the CSV's parent folder.
    bases = [p for p in (data_root, csv_path.parent, csv_path.parent.parent) if p is not None]
    pairs, names = [], []
    with open(csv_path, newline="") as handle:
        for line_no, row in enumerate(csv.reader(handle), start=1):
            row = [c.strip() for c in row if c.strip()]
            if not row:
                continue
            if len(row) < 2:
                raise ValueError(f"{csv_path}:{line_no}: expected 'rgb_path,depth_path', got {','.join(row)!r}")
            if line_no == 1 and not _is_image_path(row[0]):
                continue  # header
            rgb, depth = _resolve_relative(row[0], bases), _resolve_relative(row[1], bases)
            for path in (rgb, depth):
                if not path.is_file():
                    raise FileNotFoundError(f"{csv_path}:{line_no}: file not found: {path}")
            pairs.append((str(rgb), str(depth)))
            names.append(re.sub(r"\.[^./]+$", "", row[0].strip().lstrip("/")))
    if not pairs:
        raise ValueError(f"no samples listed in {csv_path}")
    return pairs, names


def _find_bts_filelist(folder: Path, split: str) -> Path | None:
    key = "test" if split in _TEST_SPLITS else "train"
    for base in (folder, folder / "train_test_inputs", folder.parent / "train_test_inputs", folder.parent):
        if not base.is_dir():
            continue
        matches = sorted(p for p in base.glob("*.txt") if key in p.name.lower() and "file" in p.name.lower())
        with_gt = [p for p in matches if "with_gt" in p.name]
        if with_gt or matches:
            return (with_gt or matches)[0]
    return None


def _bts_pairs(filelist: Path, folder: Path, data_root: Path | None) -> tuple[list[tuple[str, str]], list[str]]:
    bases = [
        p
        for p in (
            data_root,
            folder / "sync",
            folder / "official_splits" / "test",
            folder / "official_splits" / "train",
            folder,
            filelist.parent,
        )
        if p is not None
    ]
    pairs, names = [], []
    with open(filelist) as handle:
        for line_no, line in enumerate(handle, start=1):
            fields = line.split()
            if not fields:
                continue
            if len(fields) < 2:
                raise ValueError(f"{filelist}:{line_no}: expected 'rgb depth [focal]', got {line.strip()!r}")
            if fields[1] == "None":  # BTS lists frames without ground truth this way
                continue
            rgb, depth = _resolve_relative(fields[0], bases), _resolve_relative(fields[1], bases)
            for path in (rgb, depth):
                if not path.is_file():
                    raise FileNotFoundError(f"{filelist}:{line_no}: file not found: {path}")
            pairs.append((str(rgb), str(depth)))
            names.append(re.sub(r"\.[^./]+$", "", fields[0].lstrip("/")))
    if not pairs:
        raise ValueError(f"no samples with ground truth listed in {filelist}")
    return pairs, names


def _looks_like_path(source: str) -> bool:
    return (
        source.startswith(("/", "./", "../", "~", "."))
        or "\\" in source
        or source.count("/") > 1
        or bool(re.search(r"\.(csv|txt)$", source))
    )


_HUB_ID = re.compile(r"^[\w.-]+(/[\w.-]+)?$")


def _subset(dataset: Any, num_samples: int | None) -> Any:
    if num_samples is None:
        return dataset
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if isinstance(dataset, DepthFileDataset):
        dataset.pairs, dataset.names = dataset.pairs[:num_samples], dataset.names[:num_samples]
        return dataset
    return dataset.select(range(min(num_samples, len(dataset))))


def load_depth_dataset(
    source: str | os.PathLike,
    split: str = "train",
    *,
    max_depth: float = 10.0,
    depth_scale: float | None = None,
    image_column: str | None = None,
    depth_column: str | None = None,
    streaming: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
    height: int = 480,
    width: int = 640,
    data_root: str | os.PathLike | None = None,
    transform: Callable[[Example], Example] | None = None,
) -> Dataset:
    """Load depth examples ``{"image", "depth" (metres, 0 = invalid), "name"}`` from ``source``.

    Args:
        source: ``"synthetic"``; a DenseDepth folder or CSV file; a BTS folder or filenames
            ``.txt`` file; a ``datasets.save_to_disk`` folder; or a Hugging Face Hub dataset id.
        split: split name. Picks the CSV/filenames file for local layouts (``test``/``validation``
            -> test files) and the seed stream for synthetic data.
        max_depth: depth beyond this (and <= 0 / non-finite) becomes 0 (invalid).
        depth_scale: raw depth units per metre; ``None`` guesses (integer PNG -> mm, 8-bit PNG ->
            DenseDepth 255 = 10 m, Hub integers -> mm if max > 100, floats -> metres).
        image_column, depth_column: Hub/saved dataset columns; auto-detected if ``None``.
        streaming: stream a Hub dataset (returns an ``IterableDataset``).
        num_samples: number of examples (first ``num_samples`` of a real dataset; synthetic
            defaults to 200 for train and 24 otherwise).
        seed: base seed of synthetic scenes (each split uses a different stream).
        height, width: synthetic frame size.
        data_root: folder the paths of a CSV/filenames file are relative to, if not next to it.
        transform: callable applied to every example dict (e.g. :class:`DepthAugmentation`).

    Raises:
        FileNotFoundError: missing folder/file. ValueError: empty or unrecognised dataset.
    """
    root = Path(data_root) if data_root is not None else None
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"unknown depth dataset source {source!r}")

    if source == "synthetic":
        n = num_samples if num_samples is not None else (200 if split == "train" else 24)
        split_code = _SPLIT_CODES.get(split, zlib.crc32(split.encode()) & 0xFFFF)
        return SyntheticDepthDataset(
            n, seed=seed, split_code=split_code, height=height, width=width, max_depth=max_depth,
            name_prefix=f"synthetic_{split}", transform=transform,
        )

    path = Path(source).expanduser()
    file_kwargs = dict(depth_scale=depth_scale, max_depth=max_depth, transform=transform)
    if path.is_file():
        if path.suffix.lower() == ".csv":
            pairs, names = _densedepth_pairs(path, root)
        elif path.suffix.lower() == ".txt":
            pairs, names = _bts_pairs(path, path.parent, root)
        else:
            raise ValueError(f"unsupported dataset file {path} (expected a DenseDepth .csv or a BTS filenames .txt)")
        return _subset(DepthFileDataset(pairs, names, **file_kwargs), num_samples)

    if path.is_dir():
        hf_kwargs = dict(
            image_column=image_column, depth_column=depth_column, depth_scale=depth_scale,
            max_depth=max_depth, source=str(path), split=split, transform=transform,
        )
        if any((path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json")):
            import datasets

            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                if split not in loaded:
                    raise ValueError(f"split {split!r} not in saved dataset {path} (splits: {list(loaded)})")
                loaded = loaded[split]
            if len(loaded) == 0:
                raise ValueError(f"saved dataset {path} (split {split!r}) is empty")
            return HFDepthDataset(_subset(loaded, num_samples), **hf_kwargs)
        csv_path = _find_csv(path, split)
        if csv_path is not None:
            pairs, names = _densedepth_pairs(csv_path, root)
            return _subset(DepthFileDataset(pairs, names, **file_kwargs), num_samples)
        filelist = _find_bts_filelist(path, split)
        if filelist is not None:
            pairs, names = _bts_pairs(filelist, path, root)
            return _subset(DepthFileDataset(pairs, names, **file_kwargs), num_samples)
        raise ValueError(
            f"folder {path} is not a recognised depth dataset (no DenseDepth CSV, BTS filenames file or saved dataset)"
        )

    if _looks_like_path(source):
        raise FileNotFoundError(f"depth dataset path not found: {source}")
    if not _HUB_ID.match(source):
        raise ValueError(f"unknown depth dataset source {source!r} (not 'synthetic', a local path or a Hub id)")

    import datasets

    try:
        hf = datasets.load_dataset(source, split=split, streaming=streaming)
    except Exception as exc:
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"cannot load Hub dataset {source!r} (split={split!r}): {first_line}") from exc
    hf_kwargs = dict(
        image_column=image_column, depth_column=depth_column, depth_scale=depth_scale,
        max_depth=max_depth, source=source, split=split, transform=transform,
    )
    if streaming:
        if num_samples is not None:
            hf = hf.take(num_samples)
        return HFIterableDepthDataset(hf, **hf_kwargs)
    if len(hf) == 0:
        raise ValueError(f"Hub dataset {source!r} (split {split!r}) is empty")
    return HFDepthDataset(_subset(hf, num_samples), **hf_kwargs)


# ---------------------------------------------------------------------------------------------
# Augmentation
# ---------------------------------------------------------------------------------------------


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
        image = _to_rgb_image(image)
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
