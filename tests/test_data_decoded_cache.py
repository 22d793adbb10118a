"""Decode once (`DecodedFrames`, `TrainingExamples(..., decoded_cache=...)`): the same examples bit for bit, never
stale after a changed file or setting, an interrupted write redone, one clear error for an unwritable folder."""

import os
import shutil
import tarfile

import h5py
import numpy as np
import pytest

from modeling_moa_depthclip.data import DecodedFrames, DepthAugmentation, TrainingExamples, load_depth_dataset
from modeling_moa_depthclip.data.sources import depth_dataset_from_files

RANGE = {"min_depth": 1e-3, "max_depth": 10.0}


def _same(a, b):
    assert a["name"] == b["name"]
    assert np.array_equal(np.asarray(a["image"]), np.asarray(b["image"])) and a["image"].mode == b["image"].mode
    assert a["depth"].dtype == b["depth"].dtype and np.array_equal(a["depth"], b["depth"])


@pytest.fixture
def png_folder(nyu_sample_dir, tmp_path):
    """Three frames of the shared NYU folder, copied (tests change them)."""
    folder = tmp_path / "frames"
    folder.mkdir()
    pairs = []
    for colour in sorted(nyu_sample_dir.glob("*_colors.png"))[:3]:
        depth = colour.with_name(colour.name.replace("_colors", "_depth"))
        shutil.copy(colour, folder / colour.name)
        shutil.copy(depth, folder / depth.name)
        pairs.append((folder / colour.name, folder / depth.name))
    return pairs


@pytest.fixture
def tar_shard(png_folder, tmp_path):
    """A fast-depth `.h5` tar shard of the same frames."""
    from modeling_moa_depthclip.data import read_depth_image, read_rgb_image

    shard = tmp_path / "shard" / "val-000000.tar"
    shard.parent.mkdir()
    with tarfile.open(shard, "w") as tar:
        for i, (colour, depth) in enumerate(png_folder):
            path = tmp_path / f"{i}.h5"
            with h5py.File(path, "w") as h5:
                h5.create_dataset("rgb", data=np.transpose(np.asarray(read_rgb_image(colour)), (2, 0, 1)).copy())
                h5.create_dataset("depth", data=read_depth_image(depth).astype(np.float32))
            tar.add(path, arcname=f"val/official/{i + 1:05d}.h5")
    return shard


@pytest.mark.parametrize("source", ["png_folder", "tar_shard"])
def test_cached_examples_are_the_decoded_ones_bit_for_bit(source, request, tmp_path):
    value = request.getfixturevalue(source)
    dataset = depth_dataset_from_files(value, **RANGE) if source == "png_folder" else load_depth_dataset(value, **RANGE)
    cached = DecodedFrames(dataset, tmp_path / "cache")
    for index in range(len(dataset)):
        assert not (cached.entry(index) / "depth.npy").exists()
        _same(cached[index], dataset[index])  # decoded and written
        assert (cached.entry(index) / "depth.npy").is_file()
        _same(cached[index], dataset[index])  # read back memory-mapped
    assert len({cached.entry(i) for i in range(len(dataset))}) == len(dataset)


def test_augmented_examples_are_the_same_with_and_without_the_cache(png_folder, tmp_path):
    dataset = depth_dataset_from_files(png_folder, **RANGE)
    augmentation = DepthAugmentation()
    plain = TrainingExamples(dataset, augmentation, seed=5, target_size=(64, 64))
    cached = TrainingExamples(dataset, augmentation, seed=5, target_size=(64, 64), decoded_cache=tmp_path / "cache")
    for key in range(2 * len(dataset)):  # the first epoch writes the cache, the second reads it
        _same(cached[key], plain[key])


def test_a_changed_file_or_setting_is_decoded_anew(png_folder, tmp_path):
    cache = tmp_path / "cache"
    dataset = depth_dataset_from_files(png_folder, **RANGE)
    before = DecodedFrames(dataset, cache)[0]
    depth_file = png_folder[0][1]
    shutil.copy(png_folder[1][1], depth_file)  # another frame's depth, same size
    stat = os.stat(depth_file)
    os.utime(depth_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    after = DecodedFrames(dataset, cache)[0]
    _same(after, dataset[0])
    assert not np.array_equal(after["depth"], before["depth"])

    clipped = depth_dataset_from_files(png_folder, min_depth=1e-3, max_depth=2.0)
    _same(DecodedFrames(clipped, cache)[0], clipped[0])
    assert DecodedFrames(clipped, cache).entry(0) != DecodedFrames(dataset, cache).entry(0)
    assert DecodedFrames(clipped, cache)[0]["depth"].max() <= 2.0 < after["depth"].max()
    millimetres = depth_dataset_from_files(png_folder, depth_unit="mm", **RANGE)
    assert DecodedFrames(millimetres, cache).entry(0) != DecodedFrames(dataset, cache).entry(0)


def test_a_partly_written_entry_is_redone(png_folder, tmp_path):
    dataset = depth_dataset_from_files(png_folder, **RANGE)
    cached = DecodedFrames(dataset, tmp_path / "cache")
    complete = cached[0]
    entry = cached.entry(0)
    # what a killed write could leave: a truncated array next to the image, and no name
    (entry / "depth.npy").write_bytes((entry / "depth.npy").read_bytes()[:1000])
    (entry / "name.txt").unlink()
    _same(DecodedFrames(dataset, tmp_path / "cache")[0], complete)
    assert (entry / "name.txt").is_file() and (entry / "depth.npy").stat().st_size > 1000
    assert not [p for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")]  # no staging folder left


def test_prepare_decodes_every_frame_once(png_folder, tmp_path):
    dataset = depth_dataset_from_files(png_folder, **RANGE)
    cached = DecodedFrames(dataset, tmp_path / "cache").prepare(progress=False)
    assert all((cached.entry(i) / "rgb.npy").is_file() for i in range(len(dataset)))
    mtimes = [(cached.entry(i) / "rgb.npy").stat().st_mtime_ns for i in range(len(dataset))]
    cached.prepare(progress=False)
    assert mtimes == [(cached.entry(i) / "rgb.npy").stat().st_mtime_ns for i in range(len(dataset))]


def test_an_unwritable_folder_or_a_transformed_dataset_is_refused(png_folder, tmp_path):
    dataset = depth_dataset_from_files(png_folder, **RANGE)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    with pytest.raises(OSError, match="cannot be written") as error:
        DecodedFrames(dataset, blocker / "cache")
    assert str(blocker / "cache") in str(error.value)
    with pytest.raises(ValueError, match="without an example transform"):
        DecodedFrames(depth_dataset_from_files(png_folder, transform=DepthAugmentation(), **RANGE), tmp_path / "c")
