"""Tests for paired RGB-D augmentation, the training view of a dataset and the batch collator."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_moa_depthclip.data import (
    DepthAugmentation,
    DepthCollator,
    TrainingExamples,
    load_depth_dataset,
    with_example_transform,
)


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


def test_transform_hook_and_worker_reseeding():
    from torch.utils.data import DataLoader, Dataset

    aug = DepthAugmentation(output_size=(32, 48), seed=5)
    dataset = load_depth_dataset("synthetic", num_samples=1, height=48, width=64, transform=aug)
    assert dataset[0]["depth"].shape == (32, 48)
    # the same augmentation added to an already loaded dataset (its lazy decoding is kept)
    plain = load_depth_dataset("synthetic", num_samples=1, height=48, width=64)
    assert plain[0]["depth"].shape == (48, 64)
    assert with_example_transform(plain, aug)[0]["depth"].shape == (32, 48)

    class Angles(Dataset):
        def __len__(self):
            return 4

        def __getitem__(self, index):
            return aug.sample_params()["angle_deg"]

    torch.manual_seed(0)
    angles = [float(a) for a in DataLoader(Angles(), batch_size=1, num_workers=2)]
    # Index 0 and 1 are the first draw of worker 0 and worker 1: identical without re-seeding.
    assert angles[0] != angles[1]


def test_training_examples_depend_on_seed_epoch_and_index_only():
    base = load_depth_dataset("synthetic", num_samples=3, height=48, width=64)
    aug = DepthAugmentation(output_size=(32, 48))
    first = TrainingExamples(base, aug, seed=7, cache=True)
    second = TrainingExamples(base, aug, seed=7)
    assert len(first) == 3
    # key 4 = epoch 1, index 1: the same example however the keys are visited
    a, b = first[4], second[4]
    assert a["name"] == base[1]["name"] and a["depth"].shape == (32, 48)
    np.testing.assert_array_equal(a["depth"], b["depth"])
    np.testing.assert_array_equal(np.asarray(a["image"]), np.asarray(b["image"]))
    assert not np.array_equal(first[1]["depth"], first[4]["depth"])  # another epoch, another draw
    assert not np.array_equal(
        TrainingExamples(base, aug, seed=8)[4]["depth"], a["depth"]
    )
    unaugmented = TrainingExamples(base, None, seed=7)[4]
    np.testing.assert_array_equal(unaugmented["depth"], base[1]["depth"])


class _FixedProcessor:
    def __call__(self, images, size, return_tensors):
        return {"pixel_values": torch.zeros(len(images), 3, size["height"], size["width"])}


def test_collator_resizes_labels_with_nearest_neighbour_or_keeps_them():
    depth = np.zeros((4, 6), np.float32)
    depth[:, 3:] = 5.0  # an edge and invalid pixels: nearest neighbour never blends them
    examples = [{"image": Image.new("RGB", (6, 4)), "depth": depth, "name": "a"}] * 2
    batch = DepthCollator(_FixedProcessor(), (8, 12))(examples)
    assert batch["pixel_values"].shape == (2, 3, 8, 12) and batch["labels"].shape == (2, 8, 12)
    assert set(torch.unique(batch["labels"]).tolist()) == {0.0, 5.0}
    native = DepthCollator(_FixedProcessor(), (8, 12), labels_at_native_resolution=True)(examples)
    assert native["labels"].shape == (2, 4, 6)
    mixed = examples[:1] + [{"image": Image.new("RGB", (6, 5)), "depth": np.ones((5, 6), np.float32), "name": "b"}]
    with pytest.raises(ValueError, match="equally sized"):
        DepthCollator(_FixedProcessor(), (8, 12), labels_at_native_resolution=True)(mixed)
