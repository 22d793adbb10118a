"""Metric depth to 3D: pinhole camera intrinsics, back-projection to coloured points, PLY and glTF point files.

Conventions (OpenCV's): pixel `(u, v)` is column `u` and row `v` counted from 0 at the centre of the top-left
pixel; the camera frame has x right, y down, z forward; depth is the z coordinate (as NYU's depth maps and this
model's predictions are), so a pixel at depth `z` goes to `((u - cx) z / fx, (v - cy) z / fy, z)` metres.
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image

from ..image_processing_moa_depthclip import to_rgb8_image


__all__ = [
    "DEFAULT_HFOV_DEG",
    "NYU_INTRINSICS",
    "CameraIntrinsics",
    "PointCloud",
    "depth_to_point_cloud",
    "focal_length_35mm",
    "parse_intrinsics",
    "resolve_intrinsics",
    "write_glb",
    "write_ply",
]


@dataclass(frozen=True)
class CameraIntrinsics:
    """Pinhole intrinsics in pixels for images of `width` x `height` (0-based pixel centres, OpenCV's convention)."""

    fx: float
    fy: float
    cx: float
    cy: float
    width: int
    height: int

    def __post_init__(self):
        for name in ("fx", "fy"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"camera intrinsics: {name} must be a positive number of pixels, got {value}")
        for name in ("cx", "cy"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"camera intrinsics: {name} must be finite, got {getattr(self, name)}")
        if not (self.width > 0 and self.height > 0):
            raise ValueError(f"camera intrinsics: image size must be positive, got {self.width}x{self.height}")

    @classmethod
    def from_fov(cls, width: int, height: int, fov_deg: float) -> CameraIntrinsics:
        """Square pixels, principal point at the image centre, `fov_deg` the horizontal field of view."""
        if not (0.0 < fov_deg < 180.0):
            raise ValueError(f"horizontal field of view must be between 0 and 180 degrees, got {fov_deg}")
        focal = 0.5 * width / math.tan(math.radians(fov_deg) / 2.0)
        return cls(focal, focal, (width - 1) / 2.0, (height - 1) / 2.0, width, height)

    @property
    def horizontal_fov_deg(self) -> float:
        return math.degrees(2.0 * math.atan(self.width / (2.0 * self.fx)))

    @property
    def matrix(self) -> np.ndarray:
        """The 3x3 camera matrix K."""
        return np.array([[self.fx, 0.0, self.cx], [0.0, self.fy, self.cy], [0.0, 0.0, 1.0]])

    def resized(self, width: int, height: int) -> CameraIntrinsics:
        """The same camera for the image resized to `width` x `height` (pixel centres map to pixel centres)."""
        if (width, height) == (self.width, self.height):
            return self
        sx, sy = width / self.width, height / self.height
        return CameraIntrinsics(
            self.fx * sx, self.fy * sy, (self.cx + 0.5) * sx - 0.5, (self.cy + 0.5) * sy - 0.5, width, height
        )


# NYU Depth V2's colour camera at 640x480, as published in the dataset toolbox (camera_params.m). The toolbox
# counts pixels from 1 (MATLAB); here they count from 0, so its principal point (325.58, 253.74) is one less.
_NYU_TOOLBOX_RGB = dict(fx=5.1885790117450188e02, fy=5.1946961112127485e02, cx=3.2558244941119034e02,
                        cy=2.5373616633400465e02)  # fmt: skip
NYU_INTRINSICS = CameraIntrinsics(
    fx=_NYU_TOOLBOX_RGB["fx"],
    fy=_NYU_TOOLBOX_RGB["fy"],
    cx=_NYU_TOOLBOX_RGB["cx"] - 1.0,
    cy=_NYU_TOOLBOX_RGB["cy"] - 1.0,
    width=640,
    height=480,
)
# Without EXIF or a user's choice: NYU's horizontal field of view (~63.3 degrees), the indoor camera the model is
# trained for, and close to a phone's main camera (~65-70 degrees).
DEFAULT_HFOV_DEG = NYU_INTRINSICS.horizontal_fov_deg

PRESETS = {"nyu": NYU_INTRINSICS}

_EXIF_IFD = 0x8769
_FOCAL_LENGTH_IN_35MM_FILM = 0xA405
_FULL_FRAME_DIAGONAL_MM = math.hypot(36.0, 24.0)


def focal_length_35mm(image: Image.Image) -> float | None:
    """The EXIF 35 mm-equivalent focal length in mm (tag FocalLengthIn35mmFilm), or None when absent or zero."""
    try:
        value = image.getexif().get_ifd(_EXIF_IFD).get(_FOCAL_LENGTH_IN_35MM_FILM)
    except Exception:  # a malformed EXIF block is the same as none
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) and value > 0 else None


def parse_intrinsics(text: str) -> CameraIntrinsics | tuple[float, float, float, float]:
    """`nyu` (a preset) or `fx,fy,cx,cy` in pixels of the image being converted (returned as a tuple)."""
    name = text.strip().lower()
    if name in PRESETS:
        return PRESETS[name]
    parts = [p for p in text.replace(" ", ",").split(",") if p]
    try:
        values = tuple(float(p) for p in parts)
    except ValueError:
        values = ()
    if len(values) != 4 or not all(math.isfinite(v) for v in values) or min(values[:2]) <= 0:
        raise ValueError(
            f"intrinsics {text!r}: expected 'fx,fy,cx,cy' in pixels (fx, fy > 0) or one of the presets {sorted(PRESETS)}"
        )
    return values


def resolve_intrinsics(
    width: int,
    height: int,
    *,
    intrinsics: CameraIntrinsics | tuple[float, float, float, float] | str | None = None,
    fov_deg: float | None = None,
    image: Image.Image | None = None,
) -> tuple[CameraIntrinsics, str]:
    """The camera for a `width` x `height` depth map and where it came from, in words.

    In order: `intrinsics` (a preset, rescaled when the size differs, or fx, fy, cx, cy for this size), `fov_deg`,
    the image's EXIF 35 mm-equivalent focal length (via the diagonal of the 36 x 24 mm frame), `DEFAULT_HFOV_DEG`.
    """
    if intrinsics is not None and fov_deg is not None:
        raise ValueError("give either intrinsics or a field of view, not both")
    if isinstance(intrinsics, str):
        intrinsics = parse_intrinsics(intrinsics)
    if isinstance(intrinsics, CameraIntrinsics):
        camera = intrinsics.resized(width, height)
        scaled = "" if camera is intrinsics else f", rescaled from {intrinsics.width}x{intrinsics.height}"
        return camera, f"intrinsics fx={camera.fx:.1f} fy={camera.fy:.1f} cx={camera.cx:.1f} cy={camera.cy:.1f}{scaled}"
    if intrinsics is not None:
        fx, fy, cx, cy = (float(v) for v in intrinsics)
        camera = CameraIntrinsics(fx, fy, cx, cy, width, height)
        return camera, f"intrinsics fx={fx:g} fy={fy:g} cx={cx:g} cy={cy:g}"
    if fov_deg is not None:
        return CameraIntrinsics.from_fov(width, height, fov_deg), f"horizontal field of view {fov_deg:g} deg"
    focal_35mm = focal_length_35mm(image) if image is not None else None
    if focal_35mm is not None:
        focal = focal_35mm * math.hypot(width, height) / _FULL_FRAME_DIAGONAL_MM
        camera = CameraIntrinsics(focal, focal, (width - 1) / 2.0, (height - 1) / 2.0, width, height)
        return camera, f"EXIF 35 mm-equivalent focal length {focal_35mm:g} mm ({camera.horizontal_fov_deg:.1f} deg)"
    camera = CameraIntrinsics.from_fov(width, height, DEFAULT_HFOV_DEG)
    return camera, f"default horizontal field of view {DEFAULT_HFOV_DEG:.1f} deg (NYU's camera; no EXIF focal length)"


@dataclass
class PointCloud:
    """`points` float32 `(N, 3)` metres in the camera frame (x right, y down, z forward); `colors` uint8 `(N, 3)`."""

    points: np.ndarray
    colors: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.points)


def depth_to_point_cloud(
    depth: np.ndarray,
    intrinsics: CameraIntrinsics,
    image: Image.Image | np.ndarray | None = None,
    *,
    stride: int = 1,
    max_depth: float | None = None,
) -> PointCloud:
    """Back-project a z-depth map (metres, `(H, W)`) through `intrinsics` into a coloured point cloud.

    `intrinsics` are rescaled to the depth map's size if they were given for another one. Pixels with depth
    <= 0, not finite or beyond `max_depth` are left out; `stride` keeps every stride-th row and column; colours come
    from `image` resized to the depth map when sizes differ.
    """
    depth = np.asarray(depth, dtype=np.float32)
    if depth.ndim != 2:
        raise ValueError(f"depth must be a 2D (height, width) map, got shape {depth.shape}")
    if not (isinstance(stride, (int, np.integer)) and stride >= 1):
        raise ValueError(f"stride must be a positive integer, got {stride!r}")
    if max_depth is not None and not max_depth > 0:
        raise ValueError(f"max_depth must be > 0 metres, got {max_depth}")
    height, width = depth.shape
    camera = intrinsics.resized(width, height)
    rows = np.arange(0, height, stride)
    cols = np.arange(0, width, stride)
    z = depth[np.ix_(rows, cols)]
    keep = np.isfinite(z) & (z > 0)
    if max_depth is not None:
        keep &= z <= max_depth
    v, u = np.meshgrid(rows.astype(np.float32), cols.astype(np.float32), indexing="ij")
    z = z[keep]
    x = (u[keep] - np.float32(camera.cx)) * z / np.float32(camera.fx)
    y = (v[keep] - np.float32(camera.cy)) * z / np.float32(camera.fy)
    points = np.stack([x, y, z], axis=1).astype(np.float32)

    colors = None
    if image is not None:
        if isinstance(image, Image.Image):
            picture = to_rgb8_image(image)  # the model's reading of the picture: 16-bit, alpha, EXIF
            if picture.size != (width, height):
                picture = picture.resize((width, height), Image.BILINEAR)
            rgb = np.asarray(picture)
        else:
            rgb = np.asarray(image)
            if rgb.shape[:2] != (height, width) or rgb.ndim != 3 or rgb.shape[2] < 3:
                raise ValueError(f"colour image must be ({height}, {width}, 3) like the depth, got {rgb.shape}")
            rgb = rgb[..., :3]
            if rgb.dtype != np.uint8:
                raise ValueError(f"colour image array must be uint8, got {rgb.dtype}")
        colors = rgb[np.ix_(rows, cols)][keep].astype(np.uint8)
    return PointCloud(points, colors)


def write_ply(path: str | os.PathLike, cloud: PointCloud, *, binary: bool = True) -> None:
    """Write `cloud` as PLY: vertices x, y, z (float) and red, green, blue (uchar) when it has colours.

    Binary little-endian by default (compact; MeshLab, Open3D, CloudCompare, Blender read it); `binary=False`
    writes ASCII.
    """
    points = np.ascontiguousarray(cloud.points, dtype=np.float32)
    if points.ndim != 2 or points.shape[1] != 3:
        raise ValueError(f"points must have shape (N, 3), got {points.shape}")
    colors = cloud.colors
    if colors is not None:
        colors = np.asarray(colors)
        if colors.shape != points.shape or colors.dtype != np.uint8:
            raise ValueError(f"colors must be uint8 with the points' shape {points.shape}, got {colors.dtype} {colors.shape}")
    header = [
        "ply",
        f"format {'binary_little_endian' if binary else 'ascii'} 1.0",
        "comment metric depth back-projected by moa-depthclip; metres, camera frame x right, y down, z forward",
        f"element vertex {len(points)}",
        "property float x",
        "property float y",
        "property float z",
    ]
    if colors is not None:
        header += ["property uchar red", "property uchar green", "property uchar blue"]
    header.append("end_header")
    with open(path, "wb") as handle:
        handle.write(("\n".join(header) + "\n").encode("ascii"))
        if binary:
            fields = [("x", "<f4"), ("y", "<f4"), ("z", "<f4")]
            if colors is not None:
                fields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
            records = np.empty(len(points), dtype=fields)
            records["x"], records["y"], records["z"] = points.T
            if colors is not None:
                records["red"], records["green"], records["blue"] = colors.T
            handle.write(records.tobytes())
        else:
            if colors is None:
                lines = (f"{x:.6g} {y:.6g} {z:.6g}\n" for x, y, z in points.tolist())
            else:
                lines = (
                    f"{p[0]:.6g} {p[1]:.6g} {p[2]:.6g} {c[0]} {c[1]} {c[2]}\n"
                    for p, c in zip(points.tolist(), colors.tolist())
                )
            handle.write("".join(lines).encode("ascii"))


def write_glb(path: str | os.PathLike, cloud: PointCloud) -> None:
    """Write `cloud` as a binary glTF 2.0 (.glb) of POINTS, for web viewers (three.js, Babylon.js, gr.Model3D).

    glTF's axes are y up and z towards the viewer, so y and z are negated; the file is still in metres.
    """
    points = np.ascontiguousarray(cloud.points, dtype=np.float32) * np.array([1, -1, -1], dtype=np.float32)
    if len(points) == 0:
        raise ValueError("the point cloud is empty: no pixel has a valid depth")
    colors = cloud.colors if cloud.colors is not None else np.full(points.shape, 200, dtype=np.uint8)
    rgba = np.concatenate([colors, np.full((len(colors), 1), 255, np.uint8)], axis=1)  # 4-byte aligned
    position_bytes, color_bytes = points.tobytes(), np.ascontiguousarray(rgba).tobytes()
    binary = position_bytes + color_bytes
    document = {
        "asset": {"version": "2.0", "generator": "moa-depthclip"},
        "scene": 0,
        "scenes": [{"nodes": [0]}],
        "nodes": [{"mesh": 0}],
        "meshes": [{"primitives": [{"attributes": {"POSITION": 0, "COLOR_0": 1}, "mode": 0}]}],
        "buffers": [{"byteLength": len(binary)}],
        "bufferViews": [
            {"buffer": 0, "byteOffset": 0, "byteLength": len(position_bytes), "target": 34962},
            {"buffer": 0, "byteOffset": len(position_bytes), "byteLength": len(color_bytes), "target": 34962},
        ],
        "accessors": [
            {"bufferView": 0, "componentType": 5126, "count": len(points), "type": "VEC3",
             "min": points.min(axis=0).tolist(), "max": points.max(axis=0).tolist()},
            {"bufferView": 1, "componentType": 5121, "normalized": True, "count": len(points), "type": "VEC4"},
        ],
    }  # fmt: skip
    text = json.dumps(document, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 4)
    binary += b"\0" * (-len(binary) % 4)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<4sII", b"glTF", 2, 12 + 8 + len(text) + 8 + len(binary)))
        handle.write(struct.pack("<I4s", len(text), b"JSON") + text)
        handle.write(struct.pack("<I4s", len(binary), b"BIN\0") + binary)
