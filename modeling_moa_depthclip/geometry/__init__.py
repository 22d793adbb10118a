"""Depth to 3D: camera intrinsics and coloured point clouds (PLY, GLB)."""

from .point_cloud import (
    DEFAULT_HFOV_DEG,
    NYU_INTRINSICS,
    CameraIntrinsics,
    PointCloud,
    depth_to_point_cloud,
    focal_length_35mm,
    parse_intrinsics,
    resolve_intrinsics,
    write_glb,
    write_ply,
)
