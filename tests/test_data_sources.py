"""Tests for dataset sources: classification, local layouts and splits, `datasets` folders and the Hub."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from modeling_moa_depthclip.data import SourceKind, classify_source, load_depth_dataset


def _write_rgb(path: Path, width: int, height: int, seed: int = 0) -> np.ndarray:
    rgb = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(path)
    return rgb


def _write_depth_mm(path: Path, depth_mm: np.ndarray) -> None:
    Image.fromarray(depth_mm.astype(np.uint16)).save(path)


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
    example = load_depth_dataset(tmp_path, max_depth=10.0)[0]
    np.testing.assert_allclose(example["depth"][0], [0.0, 1.5, 0.0, 2.0])  # 0 and 12 m (> max_depth) invalid
    assert load_depth_dataset(tmp_path, max_depth=20.0)[0]["depth"][0, 2] == pytest.approx(12.0)
    np.testing.assert_allclose(load_depth_dataset(tmp_path)[0]["depth"][0], [0.0, 1.5, 12.0, 2.0])  # no range given
    np.testing.assert_allclose(load_depth_dataset(tmp_path, min_depth=1.6)[0]["depth"][0], [0.0, 0.0, 12.0, 2.0])
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
    with pytest.raises(ValueError, match="num_samples must be positive"):
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


def test_iterable_wrapper_and_offline_hub_error():
    datasets = pytest.importorskip("datasets")
    from modeling_moa_depthclip.data.sources import _wrap_hf

    rows = {"rgb": [np.zeros((4, 5, 3), np.uint8)] * 3, "depth_gt": [np.full((4, 5), 1500, np.uint16)] * 3}
    streamed = datasets.Dataset.from_dict(rows).to_iterable_dataset()
    wrapped = _wrap_hf(streamed, "validation", "stream", None, None, None, {})
    assert isinstance(wrapped, datasets.IterableDataset)
    examples = list(wrapped)
    assert [e["name"] for e in examples] == ["validation_000000", "validation_000001", "validation_000002"]
    assert examples[0]["depth"][0, 0] == pytest.approx(1.5)  # integer depth -> millimetres
    assert examples[0]["image"].mode == "RGB" and set(examples[0]) == {"image", "depth", "name"}
    # conftest forces offline mode: an unknown Hub id must fail with a one-line ValueError.
    with pytest.raises(ValueError, match="cannot load Hub dataset 'someone/no-such-depth-set'") as info:
        load_depth_dataset("someone/no-such-depth-set")
    assert "\n" not in str(info.value)




# --- classification, splits, `datasets` objects -------------------------------------------------


def test_classify_source(tmp_path):
    (tmp_path / "list.csv").write_text("a.png,b.png\n")
    assert classify_source("synthetic") is SourceKind.SYNTHETIC
    assert classify_source(tmp_path) is SourceKind.FOLDER
    assert classify_source(str(tmp_path / "list.csv")) is SourceKind.FILE
    for missing in (tmp_path / "nope", "./nope", "../data/nyu", "~/nope", "a/b/c", "nyu_test.zip", "C:\\data",
                    "train.csv", "shard-000.tar"):
        assert classify_source(missing) is SourceKind.MISSING, missing
    for hub_id in ("sayakpaul/nyu_depth_v2", "nyu_depth_v2", "someone/set.v2"):
        assert classify_source(hub_id) is SourceKind.HUB, hub_id
    for bad in ("", "   ", "not a dataset !", None):
        with pytest.raises(ValueError, match="unknown depth dataset source"):
            classify_source(bad)
    with pytest.raises(FileNotFoundError, match="depth dataset path not found: ./nope"):
        load_depth_dataset("./nope")


def _densedepth_folder(root: Path, lists: dict[str, list[str]]) -> Path:
    root.mkdir()
    for list_name, frames in lists.items():
        for frame in frames:
            _write_rgb(root / f"{frame}.png", 4, 3)
            _write_depth_mm(root / f"{frame}_depth.png", np.full((3, 4), 1000))
        (root / list_name).write_text("".join(f"{f}.png,{f}_depth.png\n" for f in frames))
    return root


def test_splits_come_from_list_names_and_unknown_splits_name_the_existing_ones(tmp_path, nyu_sample_dir):
    split = _densedepth_folder(tmp_path / "split", {"nyu2_train.csv": ["a", "b"], "nyu2_test.csv": ["c"]})
    assert [e["name"] for e in load_depth_dataset(split, "train")] == ["a", "b"]
    assert [e["name"] for e in load_depth_dataset(split, "test")] == ["c"]
    assert [e["name"] for e in load_depth_dataset(split, "eval")] == ["c"]  # alias
    with pytest.raises(ValueError, match=r"split 'validation' not in .*splits: \['test', 'train'\]"):
        load_depth_dataset(split, "validation")
    # a folder with one unsplit list serves it as each standard split, and nothing else
    for name in ("train", "validation", "val", "test"):
        assert len(load_depth_dataset(nyu_sample_dir, name)) == 25
    with pytest.raises(ValueError, match=r"split 'nonexistent' not in .*index\.csv.*\['train', 'validation', 'test'\]"):
        load_depth_dataset(nyu_sample_dir, "nonexistent")
    two = _densedepth_folder(tmp_path / "two", {"a.csv": ["a"], "b.csv": ["b"]})
    with pytest.raises(ValueError, match="several CSV files"):
        load_depth_dataset(two, "test")


def test_folder_is_a_lazy_datasets_dataset_over_file_paths(tmp_path, nyu_sample_dir, monkeypatch):
    datasets = pytest.importorskip("datasets")
    from datasets.table import embed_table_storage

    cache = tmp_path / "hf_cache"
    cache.mkdir()
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", cache)
    dataset = load_depth_dataset(nyu_sample_dir, "test")
    assert isinstance(dataset, datasets.Dataset)
    assert isinstance(dataset.features["image"], datasets.Image) and isinstance(dataset.features["depth"], datasets.Image)
    stored = dataset.with_format(None).data.table.slice(0, 1).to_pylist()[0]
    assert stored["image"] == {"bytes": None, "path": str(nyu_sample_dir / "00000_colors.png")}
    assert stored["depth"]["bytes"] is None
    for example in dataset.shard(num_shards=5, index=4):  # iterating decodes rows one by one
        assert example["depth"].dtype == np.float32 and example["image"].mode == "RGB"
    assert dataset.cache_files == [] and not any(cache.rglob("*"))  # nothing written
    assert [e["name"] for e in dataset.select([3, 1])] == [dataset[3]["name"], dataset[1]["name"]]
    # what push_to_hub uploads: the stored columns with the files' bytes embedded
    embedded = embed_table_storage(dataset.with_format(None).data.table.slice(0, 1)).to_pylist()[0]
    assert embedded["depth"]["bytes"] == (nyu_sample_dir / "00000_depth.png").read_bytes()


def test_synthetic_source_is_a_dataset_rendered_on_read():
    datasets = pytest.importorskip("datasets")
    scenes = load_depth_dataset("synthetic", "validation", num_samples=4, height=24, width=32)
    assert isinstance(scenes, datasets.Dataset) and scenes.column_names == ["scene", "name"]
    shard = scenes.shard(num_shards=2, index=1, contiguous=False)  # scenes 1 and 3
    np.testing.assert_array_equal(shard[1]["depth"], scenes[3]["depth"])
    assert shard[1]["name"] == "synthetic_validation_00003"
    assert not np.array_equal(shard[0]["depth"], shard[1]["depth"])
