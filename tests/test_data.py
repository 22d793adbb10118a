"""Tests for the data layer: sources, synthetic renderer and paired augmentation."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip.data import (
    NYU_HFOV_DEG,
    DepthAugmentation,
    camera_rays,
    load_depth_dataset,
    render_plane_depth,
    render_room,
    render_synthetic_scene,
    sanitize_depth,
)

# --- helpers ----------------------------------------------------------------------------------


def _write_rgb(path: Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _write_depth_mm(path: Path, depth_mm: np.ndarray) -> None:
    Image.fromarray(depth_mm.astype(np.uint16)).save(path)


def _ramp_pair(height: int = 48, width: int = 64):
    """Image whose red/green channels are the pixel x/y coordinates, and matching depth maps."""
    ys, xs = np.mgrid[0:height, 0:width]
    rgb = np.stack([xs, ys, np.zeros_like(xs)], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb), (xs + 1.0).astype(np.float32), (ys + 1.0).astype(np.float32)


def _params(**overrides):
    params = {
        "flip": False, "scale": 1.0, "angle_deg": 0.0, "offset": (0.5, 0.5), "brightness": 1.0,
        "contrast": 1.0, "saturation": 1.0, "hue": 0.0, "gamma": 1.0,
    }
    params.update(overrides)
    return params


# --- depth sanitising -------------------------------------------------------------------------


def test_sanitize_depth_marks_invalid_as_zero_without_mutating_input():
    raw = np.array([0.0, -1.0, np.nan, np.inf, 12.0, 5.0, 10.0], dtype=np.float32)
    out = sanitize_depth(raw, max_depth=10.0)
    np.testing.assert_array_equal(out, [0, 0, 0, 0, 0, 5, 10])
    assert out.dtype == np.float32
    assert np.isnan(raw[2]) and raw[4] == 12.0


# --- synthetic renderer -----------------------------------------------------------------------


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


# --- dataset sources --------------------------------------------------------------------------


def test_synthetic_source_splits_and_sizes():
    train = load_depth_dataset("synthetic", "train", num_samples=2, height=48, width=64)
    test = load_depth_dataset("synthetic", "test", num_samples=2, height=48, width=64)
    assert len(train) == 2
    example = train[0]
    assert set(example) == {"image", "depth", "name"}
    assert example["image"].mode == "RGB" and example["image"].size == (64, 48)
    assert example["depth"].shape == (48, 64) and example["depth"].dtype == np.float32
    assert not np.array_equal(example["depth"], test[0]["depth"])
    assert example["name"] != test[0]["name"]
    again = load_depth_dataset("synthetic", "train", num_samples=2, height=48, width=64)
    np.testing.assert_array_equal(again[1]["depth"], train[1]["depth"])
    assert len(load_depth_dataset("synthetic", "train")) == 200
    assert len(load_depth_dataset("synthetic", "test")) == 24
    with pytest.raises(IndexError):
        train[2]


def test_densedepth_folder_loads_shared_nyu_frames(nyu_sample_dir, nyu_sample_dataset):
    assert len(nyu_sample_dataset) == 25
    for example in nyu_sample_dataset:
        assert example["image"].mode == "RGB" and example["image"].size == (640, 480)
        depth = example["depth"]
        assert depth.shape == (480, 640) and depth.dtype == np.float32
        valid = depth[depth > 0]
        assert valid.size > 0.99 * depth.size
        assert valid.min() >= 0.5 and valid.max() <= 10.5
    assert len({e["name"] for e in nyu_sample_dataset}) == 25
    first_line = (nyu_sample_dir / "index.csv").read_text().splitlines()[0]
    rgb_name, depth_name = first_line.split(",")
    raw = np.array(Image.open(nyu_sample_dir / depth_name)).astype(np.float32)
    np.testing.assert_allclose(nyu_sample_dataset[0]["depth"], raw / 1000.0, rtol=1e-6)
    expected_rgb = np.array(Image.open(nyu_sample_dir / rgb_name))
    np.testing.assert_array_equal(np.asarray(nyu_sample_dataset[0]["image"]), expected_rgb)
    # The CSV file itself is also a valid source; num_samples keeps the first frames.
    subset = load_depth_dataset(nyu_sample_dir / "index.csv", num_samples=3)
    assert len(subset) == 3 and subset[0]["name"] == nyu_sample_dataset[0]["name"]


def test_densedepth_invalid_depth_and_header(tmp_path):
    _write_rgb(tmp_path / "a.png", 4, 3)
    depth_mm = np.array([[0, 1500, 12000, 2000]] * 3)
    _write_depth_mm(tmp_path / "a_depth.png", depth_mm)
    (tmp_path / "train.csv").write_text("rgb_path,depth_path\na.png,a_depth.png\n")
    example = load_depth_dataset(tmp_path)[0]
    np.testing.assert_allclose(example["depth"][0], [0.0, 1.5, 0.0, 2.0])  # 0 and 12 m (> max_depth) invalid
    assert load_depth_dataset(tmp_path, max_depth=20.0)[0]["depth"][0, 2] == pytest.approx(12.0)
    scaled = load_depth_dataset(tmp_path, depth_scale=100.0, max_depth=20.0)[0]["depth"][0]
    np.testing.assert_allclose(scaled, [0.0, 15.0, 0.0, 20.0])


def test_densedepth_size_mismatch_names_pair_and_sizes(tmp_path):
    _write_rgb(tmp_path / "bad_colors.png", 8, 6)
    _write_depth_mm(tmp_path / "bad_depth.png", np.full((3, 4), 1000))
    (tmp_path / "index.csv").write_text("bad_colors.png,bad_depth.png\n")
    dataset = load_depth_dataset(tmp_path)
    with pytest.raises(ValueError) as info:
        dataset[0]
    message = str(info.value)
    for part in ("bad_colors.png", "bad_depth.png", "8x6", "4x3"):
        assert part in message


def test_missing_empty_and_unknown_sources(tmp_path):
    missing = tmp_path / "does_not_exist"
    with pytest.raises(FileNotFoundError, match="does_not_exist"):
        load_depth_dataset(missing)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "index.csv").write_text("\n")
    with pytest.raises(ValueError, match="no samples"):
        load_depth_dataset(empty)
    (empty / "index.csv").write_text("x.png,x_depth.png\n")
    with pytest.raises(FileNotFoundError, match="x.png"):
        load_depth_dataset(empty)
    bare = tmp_path / "bare"
    bare.mkdir()
    with pytest.raises(ValueError, match="not a recognised depth dataset"):
        load_depth_dataset(bare)
    with pytest.raises(ValueError, match="unknown depth dataset source"):
        load_depth_dataset("not a dataset !")
    with pytest.raises(ValueError, match="synthetic"):
        load_depth_dataset("synthetic", num_samples=0)


def test_unreadable_file_error_names_file(tmp_path):
    (tmp_path / "a.png").write_bytes(b"not a png")
    _write_depth_mm(tmp_path / "a_depth.png", np.full((3, 4), 1000))
    (tmp_path / "index.csv").write_text("a.png,a_depth.png\n")
    with pytest.raises(OSError, match="a.png"):
        load_depth_dataset(tmp_path)[0]


def test_bts_layout(tmp_path):
    root = tmp_path / "nyu_depth_v2"
    (root / "sync" / "kitchen").mkdir(parents=True)
    (root / "official_splits" / "test" / "bathroom").mkdir(parents=True)
    (root / "train_test_inputs").mkdir()
    _write_rgb(root / "sync" / "kitchen" / "rgb_00001.png", 4, 3)
    _write_depth_mm(root / "sync" / "kitchen" / "sync_depth_00001.png", np.full((3, 4), 2500))
    _write_rgb(root / "official_splits" / "test" / "bathroom" / "rgb_00002.png", 4, 3)
    _write_depth_mm(root / "official_splits" / "test" / "bathroom" / "sync_depth_00002.png", np.full((3, 4), 1200))
    (root / "train_test_inputs" / "nyudepthv2_train_files_with_gt.txt").write_text(
        "/kitchen/rgb_00001.png /kitchen/sync_depth_00001.png 518.8579\n/kitchen/rgb_00009.png None 518.8579\n"
    )
    (root / "train_test_inputs" / "nyudepthv2_test_files_with_gt.txt").write_text(
        "bathroom/rgb_00002.png bathroom/sync_depth_00002.png 518.8579\n"
    )
    train = load_depth_dataset(root, "train")
    test = load_depth_dataset(root, "test")
    assert len(train) == 1 and len(test) == 1
    assert train[0]["depth"][0, 0] == pytest.approx(2.5)
    assert test[0]["depth"][0, 0] == pytest.approx(1.2)
    assert test[0]["name"] == "bathroom/rgb_00002"
    filelist = root / "train_test_inputs" / "nyudepthv2_test_files_with_gt.txt"
    from_file = load_depth_dataset(filelist, data_root=root / "official_splits" / "test")
    assert from_file[0]["depth"][0, 0] == pytest.approx(1.2)


def test_saved_datasets_folder(tmp_path):
    datasets = pytest.importorskip("datasets")
    rng = np.random.default_rng(0)
    depth_mm = [rng.integers(500, 9000, (6, 8)).astype(np.uint16) for _ in range(3)]
    depth_mm[0][0, 0] = 0
    features = datasets.Features(
        {"image": datasets.Image(), "depth": datasets.Image(), "name": datasets.Value("string")}
    )
    saved = datasets.Dataset.from_dict(
        {
            "image": [Image.fromarray(rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)) for _ in range(3)],
            "depth": [Image.fromarray(d) for d in depth_mm],
            "name": ["f0", "f1", "f2"],
        },
        features=features,
    )
    saved.save_to_disk(str(tmp_path / "single"))
    dataset = load_depth_dataset(tmp_path / "single")
    assert len(dataset) == 3
    example = dataset[1]
    assert example["name"] == "f1" and example["image"].mode == "RGB" and example["image"].size == (8, 6)
    np.testing.assert_allclose(example["depth"], depth_mm[1] / 1000.0, rtol=1e-6)
    assert dataset[0]["depth"][0, 0] == 0.0
    assert len(load_depth_dataset(tmp_path / "single", num_samples=2)) == 2

    # DatasetDict with float depth in metres under other column names.
    split = datasets.Dataset.from_dict(
        {"rgb": [np.zeros((6, 8, 3), np.uint8)] * 2, "depth_map": [np.full((6, 8), 2.5, np.float32)] * 2}
    )
    datasets.DatasetDict({"test": split}).save_to_disk(str(tmp_path / "dict"))
    test = load_depth_dataset(tmp_path / "dict", "test")
    assert test[0]["depth"][0, 0] == pytest.approx(2.5) and test[0]["name"] == "test_000000"
    with pytest.raises(ValueError, match="split 'train'"):
        load_depth_dataset(tmp_path / "dict", "train")
    with pytest.raises(ValueError, match="depth column 'gt'"):
        load_depth_dataset(tmp_path / "dict", "test", depth_column="gt")


# --- augmentation -----------------------------------------------------------------------------


def test_identity_and_flip_are_exact():
    image, depth_x, _ = _ramp_pair()
    aug = DepthAugmentation(color_jitter=None)
    out_image, out_depth = aug.apply(image, depth_x, _params())
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image))
    np.testing.assert_array_equal(out_depth, depth_x)
    out_image, out_depth = aug.apply(image, depth_x, _params(flip=True))
    np.testing.assert_array_equal(np.asarray(out_image), np.asarray(image)[:, ::-1])
    np.testing.assert_array_equal(out_depth, depth_x[:, ::-1])


@pytest.mark.parametrize("seed", range(6))
def test_augmentation_keeps_image_and_depth_aligned(seed):
    image, depth_x, depth_y = _ramp_pair()
    aug = DepthAugmentation(
        output_size=(40, 56), hflip_prob=0.5, scale_range=(1.0, 1.5), rotation_deg=10, color_jitter=None, seed=seed
    )
    params = aug.sample_params()
    out_image, out_x = aug.apply(image, depth_x, params)
    _, out_y = aug.apply(image, depth_y, params)
    assert out_image.size == (56, 40) and out_x.shape == (40, 56)
    rgb = np.asarray(out_image).astype(np.float32)
    # Compare away from the frame border, where bilinear image samples blend with the black fill.
    inner = (out_x > 0) & (out_y > 0)
    inner[:2], inner[-2:], inner[:, :2], inner[:, -2:] = False, False, False, False
    assert inner.sum() > 0.5 * inner.size
    # Bilinear (image) vs nearest (depth) sampling differ by at most ~1 pixel of the ramp.
    assert np.abs(rgb[..., 0] - (out_x - 1))[inner].max() <= 1.5
    assert np.abs(rgb[..., 1] - (out_y - 1))[inner].max() <= 1.5


def test_rotation_makes_corners_invalid_and_never_blends_depth():
    rng = np.random.default_rng(0)
    depth = rng.uniform(0.5, 10.0, (48, 64)).astype(np.float32)
    depth[rng.random((48, 64)) < 0.2] = 0.0  # invalid holes must not be interpolated over
    image = Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8))
    aug = DepthAugmentation(color_jitter=None)
    _, out = aug.apply(image, depth, _params(angle_deg=5.0))
    assert out[0, 0] == 0 and out[0, -1] == 0 and out[-1, 0] == 0 and out[-1, -1] == 0
    assert out[24, 32] == depth[24, 32]  # rotation about the centre keeps the centre
    assert set(np.unique(out)) <= set(np.unique(depth)) | {0.0}


def test_augmentation_is_deterministic_for_a_seed():
    example = load_depth_dataset("synthetic", num_samples=1, height=48, width=64)[0]

    def run(seed):
        aug = DepthAugmentation(seed=seed)
        return [aug(example) for _ in range(3)]

    first, second, other = run(3), run(3), run(4)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
        np.testing.assert_array_equal(a["depth"], b["depth"])
        assert a["name"] == example["name"]
    assert any(not np.array_equal(np.asarray(a["image"]), np.asarray(c["image"])) for a, c in zip(first, other))


def test_colour_jitter_changes_image_only():
    image, depth_x, _ = _ramp_pair()
    aug = DepthAugmentation(color_jitter=(0.2, 0.2, 0.2, 0.05))
    params = _params(brightness=1.2, contrast=0.8, saturation=1.2, hue=0.05)
    out_image, out_depth = aug.apply(image, depth_x, params)
    np.testing.assert_array_equal(out_depth, depth_x)
    assert not np.array_equal(np.asarray(out_image), np.asarray(image))


def test_augmentation_rejects_mismatched_pair():
    image, depth_x, _ = _ramp_pair()
    with pytest.raises(ValueError, match="64x48"):
        DepthAugmentation()(image, depth_x[:10])


def test_iterable_wrapper_and_offline_hub_error():
    datasets = pytest.importorskip("datasets")
    from modeling_moa_depthclip.data import HFIterableDepthDataset

    rows = {"rgb": [np.zeros((4, 5, 3), np.uint8)] * 3, "depth_gt": [np.full((4, 5), 1500, np.uint16)] * 3}
    streamed = datasets.Dataset.from_dict(rows).to_iterable_dataset()
    examples = list(HFIterableDepthDataset(streamed, split="validation"))
    assert [e["name"] for e in examples] == ["validation_000000", "validation_000001", "validation_000002"]
    assert examples[0]["depth"][0, 0] == pytest.approx(1.5)  # integer depth > 100 -> millimetres
    # conftest forces offline mode: an unknown Hub id must fail with a one-line ValueError.
    with pytest.raises(ValueError, match="cannot load Hub dataset 'someone/no-such-depth-set'") as info:
        load_depth_dataset("someone/no-such-depth-set")
    assert "\n" not in str(info.value)


def test_transform_hook_and_worker_reseeding():
    import torch
    from torch.utils.data import DataLoader, Dataset

    aug = DepthAugmentation(output_size=(32, 48), seed=5)
    dataset = load_depth_dataset("synthetic", num_samples=1, height=48, width=64, transform=aug)
    assert dataset[0]["depth"].shape == (32, 48)

    class Angles(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return aug.sample_params()["angle_deg"]

    torch.manual_seed(0)
    angles = [float(a) for a in DataLoader(Angles(), batch_size=1, num_workers=2)]
    # Index 0 and 1 are the first draw of worker 0 and worker 1: identical without re-seeding.
    assert angles[0] != angles[1]
