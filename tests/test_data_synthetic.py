"""Tests for the synthetic RGB-D renderer."""

from __future__ import annotations

import math

import numpy as np
import pytest

from modeling_moa_depthclip.data import (
    NYU_HFOV_DEG,
    camera_rays,
    render_plane_depth,
    render_room,
    render_synthetic_scene,
)


def test_synthetic_scene_is_deterministic_and_seed_dependent():
    rgb_a, depth_a = render_synthetic_scene(7, height=48, width=64)
    rgb_b, depth_b = render_synthetic_scene(7, height=48, width=64)
    rgb_c, depth_c = render_synthetic_scene(8, height=48, width=64)
    assert rgb_a.shape == (48, 64, 3) and rgb_a.dtype == np.uint8
    assert depth_a.shape == (48, 64) and depth_a.dtype == np.float32
    np.testing.assert_array_equal(rgb_a, rgb_b)
    np.testing.assert_array_equal(depth_a, depth_b)
    assert not np.array_equal(depth_a, depth_c)
    assert rgb_a.std() > 5  # textured and shaded, not a flat colour


def test_synthetic_depth_range_is_indoor_like():
    depths = np.concatenate([render_synthetic_scene(s, height=60, width=80)[1].ravel() for s in range(6)])
    assert depths.min() > 0.2
    assert np.mean((depths >= 0.5) & (depths <= 10.0)) > 0.95


def test_fronto_parallel_plane_depth_is_exact():
    depth = render_plane_depth(48, 64, 2.75)
    assert np.all(depth == np.float32(2.75))


def test_tilted_plane_depth_matches_analytic_formula():
    height, width, distance, tilt = 48, 64, 3.0, 30.0
    depth = render_plane_depth(height, width, distance, tilt_deg=tilt)
    focal = 0.5 * width / math.tan(math.radians(NYU_HFOV_DEG) / 2)
    y_n = (np.arange(height) + 0.5 - height / 2) / focal
    expected = distance / (1 + y_n * math.tan(math.radians(tilt)))
    np.testing.assert_allclose(depth, np.repeat(expected[:, None], width, axis=1), rtol=1e-6)
    # Depth varies with the row only (tilt about the x axis) and grows towards the top.
    assert depth[0, 0] > depth[-1, 0]


def test_camera_rays_have_unit_z_and_symmetric_xy():
    rays = camera_rays(4, 6, fov_deg=90.0)
    assert np.all(rays[..., 2] == 1.0)
    np.testing.assert_allclose(rays[0, 0, :2], -rays[-1, -1, :2])
    # 90 degree horizontal FOV: the image edge (not the pixel centre) sits at x = 1.
    assert rays[0, -1, 0] == pytest.approx((5.5 - 3) / 3)


def test_room_renderer_far_wall_floor_and_box_depth():
    height, width = 60, 80
    room, camera = (4.0, 3.0, 6.0), (2.0, 1.5, 1.0)
    focal = 0.5 * width / math.tan(math.radians(NYU_HFOV_DEG) / 2)
    _, depth = render_room(height, width, room_size=room, camera_position=camera)
    # Looking along +z: the far wall z=6 is 5 m away for the central pixels.
    np.testing.assert_array_equal(depth[25:35, 30:50], np.float32(5.0))
    # Bottom rows see the floor 1.5 m below: z-depth = 1.5 / y_n.
    rows = np.arange(54, 60)
    y_n = (rows + 0.5 - height / 2) / focal
    np.testing.assert_allclose(depth[rows, 40], 1.5 / y_n, rtol=1e-6)
    # A box whose front face is at z=3 occludes the centre at 2 m.
    _, boxed = render_room(
        height, width, room_size=room, camera_position=camera, boxes=[((1.0, 0.0, 3.0), (3.0, 2.5, 4.0))]
    )
    np.testing.assert_array_equal(boxed[25:35, 30:50], np.float32(2.0))


def test_room_renderer_rejects_camera_outside_room():
    with pytest.raises(ValueError, match="not inside the room"):
        render_room(8, 8, room_size=(3, 3, 3), camera_position=(1, 1, 5))
