"""The training view at the model input size (`TrainingExamples(..., target_size=...)`) is the same augmentation as
augmenting the full frame and letting the collator resize it: compared sample by sample and as distributions."""

import numpy as np
import pytest

from modeling_moa_depthclip import MoADepthCLIPImageProcessor
from modeling_moa_depthclip.data import DepthAugmentation, DepthCollator, TrainingExamples, default_num_workers

SIZE = (224, 224)
EPOCHS = 12


@pytest.fixture(scope="module")
def batches(nyu_sample_dataset):
    base = nyu_sample_dataset[:4]
    augmentation = DepthAugmentation()
    collator = DepthCollator(MoADepthCLIPImageProcessor(), SIZE)
    reference = TrainingExamples(base, augmentation, seed=3)
    fast = TrainingExamples(base, augmentation, seed=3, target_size=SIZE)
    keys = range(len(base) * EPOCHS)  # every frame under EPOCHS different draws of the augmentation
    return collator([reference[k] for k in keys]), collator([fast[k] for k in keys]), [fast[k] for k in keys[:2]]


def test_examples_come_out_at_the_target_size(batches):
    _, _, examples = batches
    for example in examples:
        assert example["image"].size == SIZE[::-1] and example["depth"].shape == SIZE


def test_each_sample_matches_the_reference_path(batches):
    reference, fast, _ = batches
    for old, new in zip(reference["pixel_values"], fast["pixel_values"]):
        # same flip, zoom, crop position, rotation and jitter: the pictures agree up to resampling
        assert np.corrcoef(old.flatten(), new.flatten())[0, 1] > 0.97
    old_labels, new_labels = reference["labels"], fast["labels"]
    for old, new in zip(old_labels, new_labels):
        valid = (old > 0) & (new > 0)
        assert ((old > 0) != (new > 0)).float().mean() < 0.01
        # nearest-neighbour depth: the same values, at most a pixel apart, so medians agree
        assert abs(old[valid].median() - new[valid].median()) < 0.02 * old[valid].median()


def test_distributions_match(batches):
    reference, fast, _ = batches
    old, new = reference["pixel_values"], fast["pixel_values"]
    for channel in range(3):
        assert abs(old[:, channel].mean() - new[:, channel].mean()) < 0.02
        assert abs(old[:, channel].std() / new[:, channel].std() - 1) < 0.03
    bins = np.linspace(-2.5, 2.5, 41)
    old_hist = np.histogram(old.numpy(), bins)[0] / old.numel()
    new_hist = np.histogram(new.numpy(), bins)[0] / new.numel()
    assert 0.5 * np.abs(old_hist - new_hist).sum() < 0.03  # total variation distance of the value histograms
    old_depth, new_depth = reference["labels"], fast["labels"]
    depth_bins = np.linspace(0, 10, 51)
    old_depth_hist = np.histogram(old_depth[old_depth > 0].numpy(), depth_bins)[0] / (old_depth > 0).sum().item()
    new_depth_hist = np.histogram(new_depth[new_depth > 0].numpy(), depth_bins)[0] / (new_depth > 0).sum().item()
    assert 0.5 * np.abs(old_depth_hist - new_depth_hist).sum() < 0.03


def test_the_draws_do_not_depend_on_the_path():
    # the parameters (flip, zoom, crop position, jitter factors) come from the same generator in both paths
    augmentation = DepthAugmentation()
    draws = [augmentation.sample_params(np.random.default_rng([3, epoch, 0])) for epoch in range(400)]
    assert 0.4 < np.mean([d["flip"] for d in draws]) < 0.6
    brightness = np.array([d["brightness"] for d in draws])
    assert abs(brightness.mean() - 1.0) < 0.02 and abs(brightness.std() - 0.4 / np.sqrt(12)) < 0.01


@pytest.mark.parametrize("cores, expected", [(1, 0), (2, 0), (4, 2), (16, 8), (64, 8)])
def test_default_num_workers(cores, expected):
    assert default_num_workers(cores) == expected
