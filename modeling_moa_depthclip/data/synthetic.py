"""Synthetic RGB-D scenes: vectorised ray casting of textured, shaded box rooms with furniture.

Depth is the exact z-depth (distance along the optical axis, the NYU convention) in metres; the default camera has
the field of view of the NYU Depth V2 Kinect colour camera.
"""

from __future__ import annotations

import colorsys
import math
from typing import Any, Sequence

import numpy as np

from ..geometry.point_cloud import NYU_INTRINSICS

__all__ = [
    "NYU_FOCAL",
    "NYU_HFOV_DEG",
    "camera_rays",
    "render_plane_depth",
    "render_room",
    "render_synthetic_scene",
]

# Horizontal focal length of the NYU Depth V2 RGB camera at 640x480 (BTS/AdaBins round it to 518.8579).
NYU_FOCAL = NYU_INTRINSICS.fx
NYU_HFOV_DEG = math.degrees(2.0 * math.atan(320.0 / NYU_FOCAL))  # ~63.3 degrees


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
