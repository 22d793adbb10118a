"""NYU Depth V2 in its published forms, built byte for byte from the shared frames: fast-depth .h5 trees and tar
shards, DenseDepth's Eigen test arrays (folder and nyu_test.zip), and the Hub repository that is a loading script.
Each must give the same frames, and the same metrics, as the DenseDepth folder."""

from __future__ import annotations

import csv
import logging
import tarfile
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip import MoADepthCLIPConfig
from modeling_moa_depthclip.data import load_depth_dataset
from modeling_moa_depthclip.evaluation import evaluate
from modeling_moa_depthclip.evaluation.metrics import METRIC_KEYS

h5py = pytest.importorskip("h5py")
datasets = pytest.importorskip("datasets")

NUM_FRAMES = 3


@pytest.fixture(scope="module")
def frames(nyu_sample_dir):
    """The first frames of the shared folder: (rgb uint8 HxWx3, depth float32 metres as the folder gives it)."""
    with open(nyu_sample_dir / "index.csv", newline="") as handle:
        rows = list(csv.reader(handle))[:NUM_FRAMES]
    out = []
    for rgb_name, depth_name in rows:
        rgb = np.array(Image.open(nyu_sample_dir / rgb_name).convert("RGB"))
        depth = np.array(Image.open(nyu_sample_dir / depth_name)).astype(np.float32) / np.float32(1000)
        out.append((rgb, depth))
    return rows, out


@pytest.fixture(scope="module")
def reference(frames, nyu_sample_dir, tmp_path_factory):
    """The same frames through a DenseDepth folder (a CSV of absolute paths to the shared files)."""
    rows, _ = frames
    folder = tmp_path_factory.mktemp("densedepth")
    (folder / "nyu2_test.csv").write_text("".join(f"{nyu_sample_dir / a},{nyu_sample_dir / b}\n" for a, b in rows))
    return load_depth_dataset(folder, "test")


def _write_fastdepth_h5(path: Path, rgb: np.ndarray, depth: np.ndarray) -> None:
    # fast-depth's frames: 'rgb' uint8 (3, H, W) and 'depth' float32 (H, W) in metres
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as h5:
        h5.create_dataset("rgb", data=np.ascontiguousarray(np.transpose(rgb, (2, 0, 1))))
        h5.create_dataset("depth", data=depth.astype(np.float32))


def _write_tar(path: Path, members: dict[str, Path]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w") as tar:
        for name, file in members.items():
            tar.add(file, arcname=name)


def _metrics(dataset):
    """Metrics of the package's evaluation for a fixed prediction (a function of the image), in the config's range."""
    config = MoADepthCLIPConfig()

    def predict(examples):
        return [0.5 + 4.0 * np.asarray(e["image"], np.float32).mean(axis=-1) / 255.0 for e in examples]

    result = evaluate(None, None, dataset, min_depth=config.min_depth, max_depth=config.max_depth, crop="eigen",
                      predict_fn=predict, num_visual_samples=0, show_progress=False)
    assert result["num_images"] == NUM_FRAMES
    return result["metrics"]


def _assert_same_frames(dataset, reference):
    examples, expected = list(dataset), list(reference)
    assert len(examples) == len(expected) == NUM_FRAMES
    for example, ref in zip(examples, expected):
        assert example["image"].mode == "RGB" and example["depth"].dtype == np.float32
        np.testing.assert_array_equal(np.asarray(example["image"]), np.asarray(ref["image"]))
        np.testing.assert_array_equal(example["depth"], ref["depth"])
    assert _metrics(examples) == _metrics(expected)


def test_fastdepth_h5_tree(frames, reference, tmp_path):
    _, data = frames
    root = tmp_path / "nyudepthv2"
    for i, (rgb, depth) in enumerate(data):
        _write_fastdepth_h5(root / "val" / "official" / f"{i + 1:05d}.h5", rgb, depth)
    _write_fastdepth_h5(root / "train" / "bedroom_0001" / "00001.h5", *data[0])
    with h5py.File(root / "val" / "official" / "00001.h5") as h5:  # the published layout
        assert (h5["rgb"].dtype, h5["rgb"].shape) == (np.uint8, (3, 480, 640))
        assert (h5["depth"].dtype, h5["depth"].shape) == (np.float32, (480, 640))
    validation = load_depth_dataset(tmp_path, "validation")  # the folder above nyudepthv2/ works too
    assert isinstance(validation, datasets.Dataset)
    assert validation[0]["name"] == "val/official/00001"
    _assert_same_frames(validation, reference)
    assert [e["name"] for e in load_depth_dataset(root, "train")] == ["train/bedroom_0001/00001"]
    with pytest.raises(ValueError, match=r"split 'test' not in .*\['train', 'validation'\]"):
        load_depth_dataset(root, "test")


def test_tar_shards_read_in_place_and_streamed(frames, reference, tmp_path):
    _, data = frames
    staging = tmp_path / "staging"
    files = {}
    for i, (rgb, depth) in enumerate(data):
        files[f"val/official/{i + 1:05d}.h5"] = staging / f"{i}.h5"
        _write_fastdepth_h5(staging / f"{i}.h5", rgb, depth)
    repo = tmp_path / "repo"
    # two shards, as the Hub repository splits its frames
    _write_tar(repo / "data" / "val-000000.tar", dict(list(files.items())[:2]))
    _write_tar(repo / "data" / "val-000001.tar", dict(list(files.items())[2:]))
    _write_tar(repo / "data" / "train-000000.tar", {"train/kitchen_0001/00001.h5": staging / "0.h5"})
    before = sorted(p for p in tmp_path.rglob("*"))
    validation = load_depth_dataset(repo, "validation")
    assert isinstance(validation, datasets.Dataset) and validation.column_names == ["shard", "offset", "size", "name"]
    _assert_same_frames(validation, reference)
    stream = load_depth_dataset(repo, "val", streaming=True)
    assert isinstance(stream, datasets.IterableDataset) and stream.num_shards == 2
    _assert_same_frames(stream, reference)
    assert sorted(p for p in tmp_path.rglob("*")) == before  # nothing extracted
    assert len(load_depth_dataset(repo / "data" / "train-000000.tar")) == 1  # one shard as a file
    with pytest.raises(ValueError, match=r"split 'test' not in .*\['train', 'validation'\]"):
        load_depth_dataset(repo, "test")


def _densedepth_arrays(data):
    rgb = np.stack([r for r, _ in data])
    depth = np.stack([d for _, d in data])
    crop = np.array([20, 459, 24, 615])
    return {"eigen_test_rgb.npy": rgb, "eigen_test_depth.npy": depth, "eigen_test_crop.npy": crop}


def test_densedepth_eigen_test_arrays_folder_is_memory_mapped(frames, reference, tmp_path):
    _, data = frames
    for name, array in _densedepth_arrays(data).items():
        np.save(tmp_path / name, array)
    rgb = np.load(tmp_path / "eigen_test_rgb.npy", mmap_mode="r")
    assert (rgb.dtype, rgb.shape) == (np.uint8, (NUM_FRAMES, 480, 640, 3))
    dataset = load_depth_dataset(tmp_path, "test")
    _assert_same_frames(dataset, reference)
    decoder = dataset.format["format_kwargs"]["transform"]
    assert isinstance(decoder.rgb._array, np.memmap) and isinstance(decoder.depth._array, np.memmap)
    with pytest.raises(ValueError, match=r"split 'train' not in .*\['test'\]"):
        load_depth_dataset(tmp_path, "train")


@pytest.mark.parametrize("compression", [zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED])
def test_densedepth_nyu_test_zip_read_in_place(frames, reference, tmp_path, compression):
    _, data = frames
    archive = tmp_path / "nyu_test.zip"
    with zipfile.ZipFile(archive, "w", compression=compression) as zf:
        for name, array in _densedepth_arrays(data).items():
            with zf.open(name, "w", force_zip64=True) as member:
                np.save(member, array)
    dataset = load_depth_dataset(archive, "test")
    # frames out of order: a compressed member is re-read from its start, a stored one memory-mapped
    np.testing.assert_array_equal(dataset[2]["depth"], reference[2]["depth"])
    _assert_same_frames(dataset, reference)
    decoder = dataset.format["format_kwargs"]["transform"]
    assert decoder.depth.compressed == (compression == zipfile.ZIP_DEFLATED)
    assert isinstance(decoder.depth._array, np.memmap) == (compression == zipfile.ZIP_STORED)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nyu_test.zip"]  # nothing unpacked
    assert len(load_depth_dataset(tmp_path, "test")) == NUM_FRAMES  # the folder holding the zip


def test_hub_loading_script_falls_back_to_its_tar_shards(frames, reference, tmp_path, monkeypatch, caplog):
    import huggingface_hub

    _, data = frames
    remote = tmp_path / "remote"
    staging = tmp_path / "staging"
    members = {}
    for i, (rgb, depth) in enumerate(data):
        _write_fastdepth_h5(staging / f"{i}.h5", rgb, depth)
        members[f"val/official/{i + 1:05d}.h5"] = staging / f"{i}.h5"
    _write_tar(remote / "data" / "val-000000.tar", members)
    _write_tar(remote / "data" / "train-000000.tar", {"train/a/00001.h5": staging / "0.h5"})
    repo_files = ["README.md", "nyu_depth_v2.py", "data/train-000000.tar", "data/val-000000.tar"]

    def load_dataset(path, *args, **kwargs):
        assert path == "sayakpaul/nyu_depth_v2"
        raise RuntimeError("Dataset scripts are no longer supported, but found nyu_depth_v2.py")

    downloads = []

    def hf_hub_download(repo_id, filename, repo_type=None, **kwargs):
        assert (repo_id, repo_type) == ("sayakpaul/nyu_depth_v2", "dataset")
        downloads.append(filename)
        return str(remote / filename)

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", lambda self, repo_id, repo_type=None, **kw: repo_files)
    monkeypatch.setattr(
        huggingface_hub.HfApi, "get_paths_info",
        lambda self, repo_id, paths, repo_type=None, **kw: [
            SimpleNamespace(path=p, size=(remote / p).stat().st_size) for p in paths
        ],
    )
    monkeypatch.setattr(huggingface_hub, "try_to_load_from_cache", lambda *args, **kwargs: None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    with caplog.at_level(logging.INFO, logger="modeling_moa_depthclip.data.hub"):
        validation = load_depth_dataset("sayakpaul/nyu_depth_v2", "validation")
    assert downloads == ["data/val-000000.tar"]  # only the split asked for
    size = (remote / "data" / "val-000000.tar").stat().st_size
    [line] = [r.getMessage() for r in caplog.records if r.name == "modeling_moa_depthclip.data.hub"]
    assert "Dataset scripts are no longer supported" in line and f"{size / 2**30:.2f} GiB to download" in line
    _assert_same_frames(validation, reference)

    # streaming reads the shards over HTTP (HfFileSystem), downloading nothing
    opened = []

    def open_remote(self, path, mode="rb", **kwargs):
        opened.append(path)
        return open(remote / path.split("sayakpaul/nyu_depth_v2/", 1)[1], mode)

    monkeypatch.setattr(huggingface_hub.HfFileSystem, "open", open_remote)
    downloads.clear()
    stream = load_depth_dataset("sayakpaul/nyu_depth_v2", "validation", streaming=True)
    _assert_same_frames(stream, reference)
    assert downloads == [] and opened == ["datasets/sayakpaul/nyu_depth_v2/data/val-000000.tar"]
    with pytest.raises(ValueError, match=r"split 'test' not in Hub dataset 'sayakpaul/nyu_depth_v2'"):
        load_depth_dataset("sayakpaul/nyu_depth_v2", "test")

    # a repository of tar shards alone: load_dataset reads it as webdataset rows of undecoded .h5 bytes
    webdataset = datasets.IterableDataset.from_generator(
        lambda: iter([{"__key__": "val/official/00001", "__url__": "data/val-000000.tar", "h5": b"..."}])
    )
    monkeypatch.setattr(datasets, "load_dataset", lambda path, split=None, streaming=False, **kw: webdataset)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="modeling_moa_depthclip.data.hub"):
        shards_only = load_depth_dataset("sayakpaul/nyu_depth_v2", "validation", num_samples=2)
    assert len(shards_only) == 2 and "tar shards of .h5 frames" in caplog.records[-1].getMessage()
    np.testing.assert_array_equal(shards_only[1]["depth"], reference[1]["depth"])


def test_scripts_take_every_form_as_dataset(frames, nyu_sample_dir, tmp_path):
    """train.py trains on tar shards and evaluates on the other forms; evaluate.py reads the shards: one metric set."""
    import json
    import os
    import subprocess
    import sys

    rows, data = frames
    reference = tmp_path / "densedepth"
    reference.mkdir()
    (reference / "nyu2_test.csv").write_text("".join(f"{nyu_sample_dir / a},{nyu_sample_dir / b}\n" for a, b in rows))
    h5_root, shards = tmp_path / "nyudepthv2", tmp_path / "shards"
    members = {}
    for i, (rgb, depth) in enumerate(data):
        _write_fastdepth_h5(h5_root / "val" / "official" / f"{i + 1:05d}.h5", rgb, depth)
        members[f"val/official/{i + 1:05d}.h5"] = h5_root / "val" / "official" / f"{i + 1:05d}.h5"
    _write_tar(shards / "val-000000.tar", members)
    archive = tmp_path / "nyu_test.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for name, array in _densedepth_arrays(data).items():
            with zf.open(name, "w", force_zip64=True) as member:
                np.save(member, array)

    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(repo), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = tmp_path / "run"
    train = subprocess.run(
        [sys.executable, str(repo / "examples" / "train.py"), "--config_name", "tiny", "--dataset", str(shards),
         "--train_split", "validation", "--max_train_steps", "1", "--per_device_train_batch_size", "3",
         "--no_augmentation", "--eval_split", "none", "--checkpointing_steps", "0", "--num_visual_samples", "0",
         "--final_eval_model", "final", "--output_dir", str(out), "--test_datasets",
         f"{reference}:test", f"{h5_root}:validation", f"{archive}:test"],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    results = json.loads((out / "metrics.json").read_text())["results"]
    assert sorted(results) == ["densedepth", "nyu_test.zip", "nyudepthv2"]

    def scores(result):
        assert result["num_images"] == NUM_FRAMES
        return {key: result[key] for key in METRIC_KEYS}

    expected = scores(results["densedepth"])
    assert scores(results["nyudepthv2"]) == expected and scores(results["nyu_test.zip"]) == expected

    evaluation = subprocess.run(
        [sys.executable, str(repo / "examples" / "evaluate.py"), "--model", str(out / "final"), "--dataset",
         str(shards), "--split", "validation", "--num_visual_samples", "0", "--output_dir", str(tmp_path / "eval")],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert evaluation.returncode == 0, evaluation.stderr[-3000:]
    assert scores(json.loads((tmp_path / "eval" / "metrics.json").read_text())) == expected
