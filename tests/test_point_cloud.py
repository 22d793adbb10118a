"""Depth to 3D points: analytic scenes, NYU's camera, EXIF focal lengths, and PLY / glTF files parsed back."""

import io
import json
import math
import struct

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip.data import NYU_FOCAL, render_plane_depth
from modeling_moa_depthclip.geometry.point_cloud import (
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

# NYU Depth V2 toolbox, camera_params.m (colour camera, MATLAB pixel indices from 1)
NYU_PUBLISHED = {"fx": 518.857901, "fy": 519.469611, "cx": 325.582449, "cy": 253.736166}


def test_fronto_parallel_plane_gives_z_equal_to_its_distance():
    distance = 2.5
    camera = CameraIntrinsics.from_fov(64, 48, 60.0)
    cloud = depth_to_point_cloud(np.full((48, 64), distance, np.float32), camera)
    assert len(cloud) == 48 * 64
    np.testing.assert_allclose(cloud.points[:, 2], distance, rtol=0, atol=1e-6)
    # the plane's extent is the field of view: at the edge pixel centres, x = +-(W-1)/2 * d / f
    half_width = (64 - 1) / 2 * distance / camera.fx
    assert cloud.points[:, 0].min() == pytest.approx(-half_width, rel=1e-5)
    assert cloud.points[:, 0].max() == pytest.approx(half_width, rel=1e-5)
    assert camera.horizontal_fov_deg == pytest.approx(60.0)


@pytest.mark.parametrize("tilt_deg", [25.0, -40.0])
def test_tilted_plane_stays_planar_with_its_normal_and_distance(tilt_deg):
    # the synthetic renderer's plane (data.render_plane_depth) seen through the same camera
    height, width, distance, fov = 60, 80, 3.0, 70.0
    depth = render_plane_depth(height, width, distance, tilt_deg=tilt_deg, fov_deg=fov)
    cloud = depth_to_point_cloud(depth, CameraIntrinsics.from_fov(width, height, fov))
    assert len(cloud) > 0.9 * height * width and np.ptp(cloud.points[:, 2]) > 0.5  # really tilted
    centroid = cloud.points.mean(axis=0, dtype=np.float64)
    _, singular, vt = np.linalg.svd(cloud.points - centroid, full_matrices=False)
    normal = vt[-1] * np.sign(vt[-1][2])
    assert singular[-1] / singular[0] < 1e-5  # no thickness: planar
    a = math.radians(tilt_deg)
    np.testing.assert_allclose(normal, [0.0, math.sin(a), math.cos(a)], atol=1e-5)
    assert float(normal @ centroid) == pytest.approx(distance * math.cos(a), rel=1e-5)


def test_nyu_preset_matches_the_published_camera_and_puts_the_principal_point_where_nyu_says():
    for name, value in NYU_PUBLISHED.items():
        published = getattr(NYU_INTRINSICS, name) + (1.0 if name in ("cx", "cy") else 0.0)  # back to MATLAB's 1
        assert published == pytest.approx(value, abs=1e-6), name
    assert NYU_FOCAL == NYU_INTRINSICS.fx  # one definition for the data code too
    assert parse_intrinsics("NYU") is NYU_INTRINSICS

    depth = np.random.default_rng(0).uniform(0.5, 9.0, (480, 640)).astype(np.float32)
    cloud = depth_to_point_cloud(depth, NYU_INTRINSICS)
    # the toolbox's rgb_plane2rgb_world: [xx, yy] = meshgrid(1:640, 1:480); x3 = (xx - cx_rgb) .* z / fx_rgb
    xx, yy = np.meshgrid(np.arange(1, 641), np.arange(1, 481))
    expected_x = (xx - NYU_PUBLISHED["cx"]) * depth / NYU_PUBLISHED["fx"]
    expected_y = (yy - NYU_PUBLISHED["cy"]) * depth / NYU_PUBLISHED["fy"]
    np.testing.assert_allclose(cloud.points[:, 0], expected_x.ravel(), atol=2e-5)
    np.testing.assert_allclose(cloud.points[:, 1], expected_y.ravel(), atol=2e-5)
    # on the optical axis: x changes sign between 1-based columns 325 and 326, y between rows 253 and 254
    row = cloud.points.reshape(480, 640, 3)[100]
    assert row[324, 0] < 0 < row[325, 0]
    column = cloud.points.reshape(480, 640, 3)[:, 100]
    assert column[252, 1] < 0 < column[253, 1]


def test_intrinsics_follow_a_resize_and_come_from_exif_fov_or_the_stated_default():
    half = NYU_INTRINSICS.resized(320, 240)
    assert (half.fx, half.fy) == pytest.approx((NYU_INTRINSICS.fx / 2, NYU_INTRINSICS.fy / 2))
    # pixel centres map to pixel centres: the principal point stays on the same spot of the scene
    assert (half.cx + 0.5) * 2 == pytest.approx(NYU_INTRINSICS.cx + 0.5)
    camera, source = resolve_intrinsics(320, 240, intrinsics="nyu")
    assert camera == half and "rescaled from 640x480" in source

    camera, source = resolve_intrinsics(100, 50, intrinsics=(90, 91, 49.5, 24.5))
    assert (camera.fx, camera.fy, camera.cx, camera.cy, camera.width) == (90, 91, 49.5, 24.5, 100)
    camera, source = resolve_intrinsics(100, 50, fov_deg=90.0)
    assert camera.fx == pytest.approx(50.0) and "90" in source

    # a phone photo: 26 mm equivalent on a 4:3 frame; the diagonal of 36x24 mm film is the reference
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 26
    buffer = io.BytesIO()
    Image.new("RGB", (400, 300), (90, 120, 150)).save(buffer, format="JPEG", exif=exif)
    photo = Image.open(buffer)
    assert focal_length_35mm(photo) == 26.0
    camera, source = resolve_intrinsics(400, 300, image=photo)
    assert camera.fx == pytest.approx(26.0 * 500.0 / math.hypot(36.0, 24.0))
    assert "EXIF" in source and "26 mm" in source
    assert 60 < camera.horizontal_fov_deg < 75  # a phone's main camera

    plain = Image.new("RGB", (400, 300))
    assert focal_length_35mm(plain) is None
    camera, source = resolve_intrinsics(400, 300, image=plain)
    assert camera.horizontal_fov_deg == pytest.approx(DEFAULT_HFOV_DEG) and "default" in source
    assert DEFAULT_HFOV_DEG == pytest.approx(63.3, abs=0.1)


@pytest.mark.parametrize(
    "text, message", [("1,2,3", "fx,fy,cx,cy"), ("kinect", "presets"), ("a,b,c,d", "fx,fy,cx,cy")]
)
def test_bad_intrinsics_are_one_clear_error(text, message):
    with pytest.raises(ValueError, match=message):
        parse_intrinsics(text)
    with pytest.raises(ValueError, match="fx must be a positive"):
        CameraIntrinsics(0.0, 1.0, 0.0, 0.0, 4, 4)
    with pytest.raises(ValueError, match="field of view"):
        CameraIntrinsics.from_fov(4, 4, 180.0)
    with pytest.raises(ValueError, match="either intrinsics or a field of view"):
        resolve_intrinsics(4, 4, intrinsics="nyu", fov_deg=60.0)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        depth_to_point_cloud(np.ones(4), NYU_INTRINSICS)


def test_colours_stride_and_depth_limit():
    depth = np.full((6, 8), 2.0, np.float32)
    depth[0, 0] = 0.0  # invalid
    depth[1, 2] = np.nan  # invalid
    depth[2, 4] = 9.0  # beyond the limit
    pixels = np.arange(6 * 8 * 3, dtype=np.uint8).reshape(6, 8, 3)
    camera = CameraIntrinsics.from_fov(8, 6, 60.0)
    cloud = depth_to_point_cloud(depth, camera, Image.fromarray(pixels), max_depth=5.0)
    assert len(cloud) == 6 * 8 - 3
    assert cloud.points[:, 2].max() == 2.0
    # the colour of each point is its own pixel's: recover the pixel from x, y
    u = np.rint(cloud.points[:, 0] * camera.fx / 2.0 + camera.cx).astype(int)
    v = np.rint(cloud.points[:, 1] * camera.fy / 2.0 + camera.cy).astype(int)
    np.testing.assert_array_equal(cloud.colors, pixels[v, u])

    strided = depth_to_point_cloud(depth, camera, pixels, stride=2)
    assert len(strided) == 3 * 4 - 1  # rows 0, 2, 4 and columns 0, 2, 4, 6, less the invalid (0, 0)
    assert sorted(set(np.rint(strided.points[:, 2]).tolist())) == [2.0, 9.0]
    # a smaller colour picture is resized to the depth
    small = depth_to_point_cloud(depth, camera, Image.new("RGB", (4, 3), (10, 20, 30)))
    assert (small.colors == [10, 20, 30]).all()
    with pytest.raises(ValueError, match="stride"):
        depth_to_point_cloud(depth, camera, stride=0)


def _read_ply(path):
    """An independent PLY reader: header lines, then ASCII rows or little-endian records."""
    with open(path, "rb") as handle:
        header = []
        while not header or header[-1] != "end_header":
            header.append(handle.readline().decode("ascii").strip())
        body = handle.read()
    assert header[0] == "ply"
    fmt = header[1].split()[1]
    count = int(next(line for line in header if line.startswith("element vertex")).split()[-1])
    props = [line.split()[1:] for line in header if line.startswith("property")]
    kinds = {"float": "<f4", "uchar": "u1"}
    dtype = np.dtype([(name, kinds[kind]) for kind, name in props])
    if fmt == "binary_little_endian":
        assert len(body) == count * dtype.itemsize  # nothing more, nothing less
        records = np.frombuffer(body, dtype=dtype)
    else:
        assert fmt == "ascii"
        rows = [line.split() for line in body.decode("ascii").splitlines()]
        assert len(rows) == count
        records = np.array([tuple(float(v) for v in row) for row in rows], dtype=dtype)
    return header, records


@pytest.mark.parametrize("binary", [True, False])
def test_ply_round_trips(tmp_path, binary):
    rng = np.random.default_rng(1)
    cloud = PointCloud(
        rng.normal(size=(50, 3)).astype(np.float32) * [1, 1, 4], rng.integers(0, 256, (50, 3), dtype=np.uint8)
    )
    path = tmp_path / "cloud.ply"
    write_ply(path, cloud, binary=binary)
    header, records = _read_ply(path)
    assert header[1] == ("format binary_little_endian 1.0" if binary else "format ascii 1.0")
    points = np.stack([records["x"], records["y"], records["z"]], axis=1)
    tolerance = 0 if binary else 1e-5  # ASCII keeps 6 significant digits
    np.testing.assert_allclose(points, cloud.points, rtol=tolerance, atol=tolerance)
    np.testing.assert_array_equal(np.stack([records["red"], records["green"], records["blue"]], axis=1), cloud.colors)

    write_ply(path, PointCloud(cloud.points), binary=binary)  # without colours
    header, records = _read_ply(path)
    assert records.dtype.names == ("x", "y", "z") and len(records) == 50


def test_glb_holds_the_points_in_gltf_axes(tmp_path):
    cloud = PointCloud(
        np.array([[0.5, -1.0, 2.0], [1.0, 2.0, 3.0]], np.float32), np.array([[255, 0, 0], [0, 0, 255]], np.uint8)
    )
    path = tmp_path / "cloud.glb"
    write_glb(path, cloud)
    data = path.read_bytes()
    magic, version, length = struct.unpack_from("<4sII", data)
    assert (magic, version, length) == (b"glTF", 2, len(data))
    json_length, kind = struct.unpack_from("<I4s", data, 12)
    document = json.loads(data[20 : 20 + json_length])
    assert kind == b"JSON" and document["meshes"][0]["primitives"][0]["mode"] == 0  # POINTS
    bin_length, kind = struct.unpack_from("<I4s", data, 20 + json_length)
    binary = data[28 + json_length : 28 + json_length + bin_length]
    positions = np.frombuffer(binary, np.float32, count=6).reshape(2, 3)
    np.testing.assert_array_equal(positions, cloud.points * [1, -1, -1])  # y up, z towards the viewer
    colour_view = document["bufferViews"][1]
    rgba = np.frombuffer(binary, np.uint8, count=8, offset=colour_view["byteOffset"]).reshape(2, 4)
    np.testing.assert_array_equal(rgba[:, :3], cloud.colors)
    assert document["accessors"][0]["min"] == positions.min(axis=0).tolist()
    with pytest.raises(ValueError, match="empty"):
        write_glb(path, PointCloud(np.zeros((0, 3), np.float32)))


# ---------------------------------------------------------------- moa-depthclip predict --point-cloud


def test_predict_writes_a_ply_per_image_with_the_chosen_camera(checkpoint, nyu_sample_dir, tmp_path, capsys):
    from modeling_moa_depthclip.cli.predict import main

    frame = nyu_sample_dir / "00000_colors.png"
    out = tmp_path / "out"
    argv = ["predict", str(frame), "--model", str(checkpoint), "--output-dir", str(out), "--point-cloud"]
    assert main([*argv, "--intrinsics", "nyu"]) == 0
    assert "307200 points (intrinsics fx=518.9" in capsys.readouterr().out
    depth = np.load(out / "00000_colors_depth.npy")
    header, records = _read_ply(out / "00000_colors_points.ply")
    assert header[1] == "format binary_little_endian 1.0" and len(records) == 480 * 640
    np.testing.assert_array_equal(records["z"], depth.ravel())
    xx = np.tile(np.arange(1, 641), 480)  # the toolbox's 1-based columns
    np.testing.assert_allclose(records["x"], (xx - NYU_PUBLISHED["cx"]) * depth.ravel() / NYU_PUBLISHED["fx"],
                               rtol=1e-5, atol=1e-6)  # fmt: skip
    rgb = np.asarray(Image.open(frame).convert("RGB")).reshape(-1, 3)
    np.testing.assert_array_equal(np.stack([records["red"], records["green"], records["blue"]], axis=1), rgb)

    # the user's file is kept; --overwrite with a field of view replaces it
    assert main([*argv, "--fov", "90"]) == 1
    assert "exists" in capsys.readouterr().err
    assert main([*argv, "--fov", "90", "--overwrite"]) == 0
    assert "horizontal field of view 90 deg" in capsys.readouterr().out
    _, records = _read_ply(out / "00000_colors_points.ply")
    assert records["x"].max() == pytest.approx(319.5 / 320.0 * depth[:, -1].max(), rel=1e-5)


def test_predict_camera_options_are_checked(checkpoint, nyu_sample_dir, tmp_path, capsys):
    from modeling_moa_depthclip.cli.predict import main

    argv = ["predict", str(nyu_sample_dir / "00000_colors.png"), "--model", str(checkpoint), "--output-dir",
            str(tmp_path / "out")]  # fmt: skip
    for extra, message in [
        (["--fov", "60"], "add --point-cloud"),
        (["--point-cloud", "--fov", "200"], "between 0 and 180"),
        (["--point-cloud", "--intrinsics", "500,500,320"], "fx,fy,cx,cy"),
        (["--point-cloud", "--intrinsics", "nyu", "--fov", "60"], "not allowed with"),
    ]:
        with pytest.raises(SystemExit) as exit_info:
            main([*argv, *extra])
        assert exit_info.value.code == 2
        assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
