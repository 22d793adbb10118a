"""Depth dataset sources as `datasets` objects, and the one classifier of a source string.

`load_depth_dataset` returns a `datasets.Dataset` (or, streaming, a `datasets.IterableDataset`) whose rows, as
consumers see them, are `{"image": PIL.Image RGB, "depth": float32 [H, W] metres (0 = invalid), "name": str}`:

* a local folder or list file becomes a `Dataset` over the file paths with `Image` columns plus a decoding
  transform (`with_transform`): nothing is decoded, copied or cached until a row is read;
* a `save_to_disk` folder or a Hub dataset keeps its own storage and gets the same decoding transform;
* NYU Depth V2 as published (fast-depth `.h5` trees and tar shards, DenseDepth's Eigen test arrays, Hub loading
  scripts over tar shards) is read in place by `modeling_moa_depthclip.data.nyu` and `.hub`; shards and streams
  are `IterableDataset`s;
* `"synthetic"` is a `Dataset` of scene names whose pixels are rendered when a row is read.

`.select`, `.shard`, `.train_test_split` and `.push_to_hub` work as on any `datasets.Dataset` (pushing uploads the
stored columns: for a folder, its images with their file bytes).
"""

from __future__ import annotations

import enum
import logging
import os
import re
import zlib
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import datasets

from ..utils import first_line, is_hub_id
from .decoding import DepthExampleDecoder, Example
from .hub import is_loading_script_error, load_hub_tar_shards
from .layouts import find_split_lists, normalise_split, read_bts_list, read_densedepth_csv, select_split
from .nyu import find_nyu_layout, load_nyu_layout
from .reading import make_example
from .synthetic import render_synthetic_scene

__all__ = [
    "DepthExampleDecoder",
    "SourceKind",
    "SyntheticSceneDecoder",
    "classify_source",
    "depth_dataset_from_files",
    "load_depth_dataset",
    "with_example_transform",
]

logger = logging.getLogger(__name__)

_PATH_SUFFIXES = (".csv", ".txt", ".json", ".h5", ".tar", ".zip", ".npy")


class SourceKind(str, enum.Enum):
    """What a dataset source string names."""

    SYNTHETIC = "synthetic"
    FILE = "file"  # a local file: a DenseDepth CSV, a BTS filenames file, a .tar shard or nyu_test.zip
    FOLDER = "folder"  # a local folder (list files, .h5 tree, shards, DenseDepth arrays or save_to_disk)
    MISSING = "missing"  # written like a local path, but nothing is there
    HUB = "hub"  # a Hugging Face Hub dataset id


def classify_source(source: str | os.PathLike) -> SourceKind:
    """Classify a dataset source: `"synthetic"`, an existing local file or folder, a local path that does not exist
    (absolute or starting with `.`/`~`, several `/`, a backslash or a data-file suffix), or a Hub id (`name` or
    `owner/name`). Anything else raises a `ValueError`."""
    if isinstance(source, os.PathLike):
        source = os.fspath(source)
    if not isinstance(source, str) or not source.strip():
        raise ValueError(f"unknown depth dataset source {source!r}")
    if source == "synthetic":
        return SourceKind.SYNTHETIC
    path = Path(source).expanduser()
    if path.is_file():
        return SourceKind.FILE
    if path.is_dir():
        return SourceKind.FOLDER
    if (
        source.startswith(("/", ".", "~"))
        or "\\" in source
        or source.count("/") > 1
        or re.match(r"^[A-Za-z]:", source)
        or source.lower().endswith(_PATH_SUFFIXES)
    ):
        return SourceKind.MISSING
    if is_hub_id(source):
        return SourceKind.HUB
    raise ValueError(f"unknown depth dataset source {source!r} (not 'synthetic', a local path or a Hub id)")


class SyntheticSceneDecoder(DepthExampleDecoder):
    """Batch transform rendering the synthetic scene of each row (`scene` index, seeded by `(seed, split_code)`)."""

    def __init__(self, *, seed: int, split_code: int, height: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.seed, self.split_code, self.height, self.width = seed, split_code, height, width

    def decode(self, row: Mapping[str, Any]) -> Example:
        rgb, depth = render_synthetic_scene((self.seed, self.split_code, int(row["scene"])), self.height, self.width)
        example = make_example(rgb, depth, row["name"], min_depth=self.min_depth, max_depth=self.max_depth)
        return self.transform(example) if self.transform is not None else example


def with_example_transform(dataset, transform: Callable[[Example], Example] | None):
    """`dataset` with `transform` applied to each decoded example (after the decoding transform it already has).

    Works on the datasets of `load_depth_dataset`: map-style ones keep their lazy `with_transform` decoding, and
    streaming ones get a lazy `.map`.
    """
    if transform is None:
        return dataset
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.map(transform)
    decoder = dataset.format.get("format_kwargs", {}).get("transform")
    if not isinstance(decoder, DepthExampleDecoder):
        raise ValueError("with_example_transform needs a dataset from load_depth_dataset (with its decoding transform)")
    return dataset.with_transform(decoder.then(transform))


# ---------------------------------------------------------------------------------------------
# Builders
# ---------------------------------------------------------------------------------------------


def depth_dataset_from_files(
    pairs: Sequence[tuple[str, str]],
    names: Sequence[str] | None = None,
    *,
    source: str = "files",
    **decoder_kwargs,
):
    """A lazily decoded `datasets.Dataset` over `(rgb file, depth file)` pairs (see `DepthExampleDecoder`)."""
    pairs = [(os.fspath(a), os.fspath(b)) for a, b in pairs]
    names = list(names) if names is not None else [Path(a).stem for a, _ in pairs]
    if len(names) != len(pairs):
        raise ValueError(f"got {len(names)} names for {len(pairs)} file pairs")
    # Image values given as paths are stored as {"path", "bytes": None}: the table holds paths, not pixels. They are
    # decoded by the decoding transform, not by `datasets`, so that a truncated or corrupt file is named in the error.
    stored = datasets.Image(decode=False)
    features = datasets.Features({"image": stored, "depth": stored, "name": datasets.Value("string")})
    table = datasets.Dataset.from_dict(
        {"image": [a for a, _ in pairs], "depth": [b for _, b in pairs], "name": names}, features=features
    )
    return table.with_transform(DepthExampleDecoder(source=source, **decoder_kwargs))


_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


def _synthetic(split: str, num_samples: int | None, seed: int, height: int, width: int, **decoder_kwargs):

    split = normalise_split(split)
    n = num_samples if num_samples is not None else (200 if split == "train" else 24)
    if n <= 0:
        raise ValueError(f"synthetic dataset needs num_samples > 0, got {n}")
    split_code = _SPLIT_CODES.get(split, zlib.crc32(split.encode()) & 0xFFFF)
    table = datasets.Dataset.from_dict(
        {"scene": list(range(n)), "name": [f"synthetic_{split}_{i:05d}" for i in range(n)]}
    )
    decoder = SyntheticSceneDecoder(seed=seed, split_code=split_code, height=height, width=width,
                                    source="synthetic", **decoder_kwargs)
    return table.with_transform(decoder)


def _take(dataset, num_samples: int | None):
    if num_samples is None:
        return dataset
    if num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    if isinstance(dataset, datasets.IterableDataset):
        return dataset.take(num_samples)
    return dataset.select(range(min(num_samples, len(dataset))))


_IMAGE_COLUMNS = ("image", "rgb", "img", "color", "colors", "rgb_image")
_DEPTH_COLUMNS = ("depth_map", "depth", "depth_gt", "gt_depth", "depth_image")
_NAME_COLUMNS = ("name", "file_name", "filename", "id", "image_id")


def _pick_column(columns: Sequence[str], requested: str | None, candidates: Sequence[str], what: str, source: str) -> str:
    if requested is not None:
        if requested not in columns:
            raise ValueError(f"{what} column {requested!r} not in dataset {source} (columns: {list(columns)})")
        return requested
    for candidate in candidates:
        if candidate in columns:
            return candidate
    raise ValueError(
        f"cannot find a {what} column in dataset {source} (columns: {list(columns)}; tried {list(candidates)}); "
        f"pass {what}_column="
    )


def _hub_columns(columns: Sequence[str], image_column: str | None, depth_column: str | None, source: str):
    image = _pick_column(columns, image_column, _IMAGE_COLUMNS, "image", source)
    depth = _pick_column(columns, depth_column, _DEPTH_COLUMNS, "depth", source)
    name = next((c for c in _NAME_COLUMNS if c in columns and c not in (image, depth)), None)
    return image, depth, name


def _wrap_hf(hf, split: str, source: str, image_column, depth_column, num_samples, decoder_kwargs):
    """A stored `datasets` split (map-style or streaming) with the decoding transform; frames without a name
    column are named `<split>_<index:06d>`."""
    if isinstance(hf, datasets.IterableDataset):
        columns = list(hf.column_names or []) or list(next(iter(hf)).keys())
        image, depth, name = _hub_columns(columns, image_column, depth_column, source)
        if num_samples is not None:
            hf = hf.take(num_samples)
        decoder = DepthExampleDecoder(image, depth, name or "name", source=source, **decoder_kwargs)
        if name is None:
            hf = hf.map(lambda row, index: {"name": f"{split}_{index:06d}"}, with_indices=True)
        return hf.map(decoder.decode, remove_columns=[c for c in columns if c not in ("image", "depth", "name")] or None)
    if len(hf) == 0:
        raise ValueError(f"dataset {source} (split {split!r}) is empty")
    image, depth, name = _hub_columns(hf.column_names, image_column, depth_column, source)
    hf = _take(hf, num_samples)
    if name is None:
        name = "name" if "name" not in hf.column_names else "__name__"
        hf = hf.add_column(name, [f"{split}_{i:06d}" for i in range(len(hf))])
    return hf.with_transform(DepthExampleDecoder(image, depth, name, source=source, **decoder_kwargs))


def _load_local_list(path: Path, split: str, data_root: Path | None, num_samples, decoder_kwargs):
    source = str(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".csv":
            pairs, names = read_densedepth_csv(path, data_root)
        elif suffix == ".txt":
            pairs, names = read_bts_list(path, path.parent, data_root)
        else:
            raise ValueError(f"unsupported dataset file {path} (expected a DenseDepth .csv or a BTS filenames .txt)")
        return _take(depth_dataset_from_files(pairs, names, source=source, **decoder_kwargs), num_samples)
    layout, lists, unsplit = find_split_lists(path)
    if not layout:
        raise ValueError(
            f"folder {path} is not a recognised depth dataset (no DenseDepth CSV, BTS filenames file or saved dataset)"
        )
    list_file = select_split(split, lists, unsplit, source)
    if layout == "densedepth":
        pairs, names = read_densedepth_csv(list_file, data_root)
    else:
        pairs, names = read_bts_list(list_file, path, data_root)
    return _take(depth_dataset_from_files(pairs, names, source=f"{source} ({list_file.name})", **decoder_kwargs), num_samples)


def _load_saved(path: Path, split: str, image_column, depth_column, num_samples, decoder_kwargs):
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
    
        wanted = split if split in loaded else normalise_split(split)
        if wanted not in loaded:
            raise ValueError(f"split {split!r} not in saved dataset {path} (splits: {list(loaded)})")
        loaded = loaded[wanted]
    return _wrap_hf(loaded, split, str(path), image_column, depth_column, num_samples, decoder_kwargs)


def _is_saved_dataset(path: Path) -> bool:
    return any((path / marker).is_file() for marker in ("dataset_info.json", "state.json", "dataset_dict.json"))


def load_depth_dataset(
    source: str | os.PathLike,
    split: str = "train",
    *,
    min_depth: float | None = None,
    max_depth: float | None = None,
    depth_unit: str | None = None,
    depth_scale: float | None = None,
    image_column: str | None = None,
    depth_column: str | None = None,
    streaming: bool = False,
    num_samples: int | None = None,
    seed: int = 0,
    height: int = 480,
    width: int = 640,
    data_root: str | os.PathLike | None = None,
    transform: Callable[[Example], Example] | None = None,
):
    """Load depth examples `{"image", "depth" (metres, 0 = invalid), "name"}` from `source` as a `datasets` object.

    Args:
        source: `"synthetic"`; a DenseDepth folder or CSV file; a BTS folder or filenames `.txt` file; a fast-depth
            `.h5` folder, a folder of `.tar` shards or one shard; DenseDepth's `nyu_test.zip` or a folder with its
            `.npy` arrays; a `datasets.save_to_disk` folder; or a Hugging Face Hub dataset id (a loading script
            over tar shards is read through its shards). See `classify_source`.
        split: split name; an unknown split is an error naming the splits that exist. For a folder, splits come
            from its list files' names, and a folder with one unsplit list serves it as every standard split
            (see `modeling_moa_depthclip.data.layouts`). For synthetic data it picks the seed stream.
        min_depth, max_depth: depth outside this range becomes 0 (invalid); None does not clip. Pass the model's
            `config.min_depth` / `config.max_depth`.
        depth_unit, depth_scale: the stored depth unit (`"m"`, `"dm"`, `"cm"`, `"mm"`, `"densedepth8"`) or stored
            units per metre; default: the rule of `modeling_moa_depthclip.data.reading` (floats are metres, 8-bit
            integers DenseDepth's scale, other integers millimetres).
        image_column, depth_column: columns of a Hub or saved dataset; detected if None.
        streaming: stream a Hub dataset or tar shards member by member (returns a `datasets.IterableDataset`).
        num_samples: keep the first N examples (synthetic: N scenes, default 200 for train and 24 otherwise).
        seed, height, width: seed stream and frame size of synthetic scenes.
        data_root: folder the paths of a CSV or filenames file are relative to, if not next to it.
        transform: applied to each decoded example (e.g. a `DepthAugmentation`).

    Raises:
        FileNotFoundError: a missing folder, file or listed frame. ValueError: an unknown source or split, or an
        empty dataset.
    """
    kind = classify_source(source)
    source = os.fspath(source)
    if num_samples is not None and num_samples <= 0:
        raise ValueError(f"num_samples must be positive, got {num_samples}")
    decoder_kwargs = dict(
        depth_unit=depth_unit, depth_scale=depth_scale, min_depth=min_depth, max_depth=max_depth, transform=transform
    )
    if kind is SourceKind.SYNTHETIC:
        return _synthetic(split, num_samples, seed, height, width, **decoder_kwargs)
    if kind is SourceKind.MISSING:
        raise FileNotFoundError(f"depth dataset path not found: {source}")
    root = Path(data_root).expanduser() if data_root is not None else None
    path = Path(source).expanduser()
    if kind is SourceKind.FOLDER and _is_saved_dataset(path):
        return _load_saved(path, split, image_column, depth_column, num_samples, decoder_kwargs)
    if kind in (SourceKind.FILE, SourceKind.FOLDER):
        layout = find_nyu_layout(path)
        if layout is not None:
            return _take(load_nyu_layout(path, layout, split, streaming=streaming, **decoder_kwargs), num_samples)
        return _load_local_list(path, split, root, num_samples, decoder_kwargs)
    return _load_hub(source, split, streaming, image_column, depth_column, num_samples, decoder_kwargs)


def _load_hub(source: str, split: str, streaming: bool, image_column, depth_column, num_samples, decoder_kwargs):

    # A streaming view first: it tells what the repository holds without downloading or converting it.
    try:
        stream = datasets.load_dataset(source, split=split, streaming=True)
        columns = list(stream.column_names or []) or list(next(iter(stream), {}).keys())
    except Exception as exc:
        if not is_loading_script_error(exc):
            raise ValueError(f"cannot load Hub dataset {source!r} (split={split!r}): {first_line(exc)}") from exc
        reason = f"datasets.load_dataset cannot read it ({first_line(exc)})"
        return _take(load_hub_tar_shards(source, split, reason=reason, streaming=streaming, **decoder_kwargs), num_samples)
    if "h5" in columns and not any(c in columns for c in _IMAGE_COLUMNS):
        reason = "it holds tar shards of .h5 frames, which datasets.load_dataset reads as undecoded bytes"
        return _take(load_hub_tar_shards(source, split, reason=reason, streaming=streaming, **decoder_kwargs), num_samples)
    if streaming:
        hf = stream
    else:
        try:
            hf = datasets.load_dataset(source, split=split)
        except Exception as exc:
            raise ValueError(f"cannot load Hub dataset {source!r} (split={split!r}): {first_line(exc)}") from exc
    logger.info(f"{source} ({split}): loaded with datasets.load_dataset" + (" (streaming)" if streaming else ""))
    return _wrap_hf(hf, split, source, image_column, depth_column, num_samples, decoder_kwargs)

