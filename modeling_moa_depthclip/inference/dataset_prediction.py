"""Depth for a whole dataset: the reusable parts of `examples/predict_dataset.py`.

The rows of the input are cut into fixed shards by row index (shard `k` holds rows `[k * S, (k + 1) * S)`), whatever
the number of processes. Processes take whole shards (`Accelerator.split_between_processes` over the shards still to
do) and write each one atomically, so a run killed at any moment and started again, with any number of processes,
skips the complete shards and computes every other row exactly once.

Output folder:

    prediction_settings.json   what the run computes (model, dataset, shard size, depth format, ...); a restart
                               into the same folder must match it
    data/shard-00000.parquet   one file per complete shard: the input's columns, `row_index`, the depth column and
                               `uncertainty` when the model predicts it
    errors/shard-00000.jsonl   the shard's rows that could not be read: {"row_index", "reason"}
    .incomplete/               files being written (a shard file appears in data/ only once complete)
    errors.jsonl, summary.json, README.md   written when every shard is complete (README.md is the dataset card,
                               so `datasets.load_dataset(output_dir)` and the Hub read the shards)
"""

from __future__ import annotations

import io
import json
import math
import os
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..image_processing_moa_depthclip import ImageLoadError, decode_image, load_image_file
from ..loading import load_model_and_processor
from ..utils import first_line


__all__ = [
    "DEPTH_FORMATS",
    "DTYPES",
    "DatasetPredictionError",
    "IndexedRows",
    "InputRows",
    "PredictionOutput",
    "PreparedRow",
    "ShardPlan",
    "ShardPredictor",
    "SharedProgress",
    "check_output_columns",
    "decode_depth",
    "depth_feature",
    "encode_depth",
    "load_inference_model",
    "map_style_rows",
    "open_input",
    "predicts_uncertainty",
    "prepare_row",
    "push_folder_to_hub",
    "stream_rows",
]

DEPTH_FORMATS = ("png16", "float16")
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
DTYPES = tuple(TORCH_DTYPES)
ROW_INDEX_COLUMN = "row_index"
UNCERTAINTY_COLUMN = "uncertainty"
SETTINGS_FILE = "prediction_settings.json"
SUMMARY_FILE = "summary.json"
ERRORS_FILE = "errors.jsonl"
CARD_FILE = "README.md"
DATA_DIR, ERRORS_DIR, INCOMPLETE_DIR = "data", "errors", ".incomplete"
# zlib level of the PNGs written: on a 640x480 NYU frame, level 1 encodes the 16-bit depth in 37 ms instead of 195 ms
# (PIL's default, 6) for 13 % more bytes, and the RGB image in 84 ms instead of 351 ms
PNG_COMPRESS_LEVEL = 1
_SAVED_DATASET_MARKERS = ("dataset_info.json", "state.json", "dataset_dict.json")


class DatasetPredictionError(ValueError):
    """A dataset, argument or output folder that cannot be used: one line naming it and the reason."""


# ------------------------------------------------------------------------------------------------
# Model
# ------------------------------------------------------------------------------------------------


def load_inference_model(model_id: str, dtype: str, device: torch.device | str | None):
    """The model (eval mode) and image processor in the precision `dtype` names (one of `DTYPES`), on `device`.

    The one place where a precision choice becomes a model: another precision (a quantized one) is added here.
    """
    if dtype not in TORCH_DTYPES:
        raise DatasetPredictionError(f"dtype {dtype!r} is not one of {list(DTYPES)}")
    return load_model_and_processor(model_id, device=device, dtype=TORCH_DTYPES[dtype])


def _device_dtype(model) -> tuple[torch.device, torch.dtype]:
    parameter = next(model.parameters(), None)
    return (parameter.device, parameter.dtype) if parameter is not None else (torch.device("cpu"), torch.float32)


@torch.no_grad()
def predicts_uncertainty(model, image_processor) -> bool:
    """Whether the model's output carries a per-pixel `depth_uncertainty` (tried on one blank image), so that every
    shard of a run has the same columns."""
    size = image_processor.size
    blank = Image.new("RGB", (size["width"], size["height"]), (128, 128, 128))
    device, dtype = _device_dtype(model)
    pixel_values = image_processor(blank, return_tensors="pt")["pixel_values"].to(device=device, dtype=dtype)
    return getattr(model(pixel_values=pixel_values), "depth_uncertainty", None) is not None


# ------------------------------------------------------------------------------------------------
# Depth values in the output
# ------------------------------------------------------------------------------------------------


def depth_feature(depth_format: str):
    """The `datasets` feature a depth map is stored as: a uint16 millimetre PNG (`Image`) or float16 metres."""
    import datasets

    if depth_format == "png16":
        return datasets.Image()
    if depth_format == "float16":
        return datasets.List(datasets.List(datasets.Value("float16")))
    raise DatasetPredictionError(f"depth format {depth_format!r} is not one of {list(DEPTH_FORMATS)}")


def encode_depth(depth_metres: np.ndarray, depth_format: str):
    """A float32 depth map (metres) as the value of `depth_feature(depth_format)`."""
    if depth_format == "png16":
        from ..cli.predict import depth_to_millimetres_png

        buffer = io.BytesIO()
        depth_to_millimetres_png(depth_metres).save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        return {"bytes": buffer.getvalue(), "path": None}
    if depth_format == "float16":
        return np.asarray(depth_metres, dtype=np.float16)
    raise DatasetPredictionError(f"depth format {depth_format!r} is not one of {list(DEPTH_FORMATS)}")


def decode_depth(value, depth_format: str) -> np.ndarray:
    """A stored depth value (as `datasets` reads it back) as float32 metres."""
    if depth_format == "png16":
        image = value if isinstance(value, Image.Image) else Image.open(io.BytesIO(value["bytes"]))
        return np.asarray(image, dtype=np.float32) / 1000.0
    return np.asarray(value, dtype=np.float32)


# ------------------------------------------------------------------------------------------------
# Input
# ------------------------------------------------------------------------------------------------


@dataclass
class InputRows:
    """The rows to label.

    `dataset` is map-style or streaming. Raw rows (`decoded=False`) come as stored, their `Image` columns undecoded
    (`{"bytes", "path"}`), and are kept as they are in the output. Rows of `load_depth_dataset` (`decoded=True`) are
    its decoded examples `{"image", "depth" (metres), "name"}`, kept as an image, a depth map and a name.
    """

    dataset: Any
    source: str
    image_column: str
    decoded: bool
    kept_features: Any  # datasets.Features of the kept input columns, as written
    num_rows: int | None  # None for a stream

    @property
    def columns(self) -> list[str]:
        return list(self.kept_features)


def _image_columns(features) -> list[str]:
    import datasets

    return [name for name, feature in features.items() if isinstance(feature, datasets.Image)]


def _choose_image_column(features, requested: str | None, source: str) -> str:
    candidates = _image_columns(features)
    if requested is not None:
        if requested not in features:
            raise DatasetPredictionError(
                f"image column {requested!r} not in dataset {source} (columns: {list(features)})"
            )
        if requested not in candidates:
            raise DatasetPredictionError(
                f"column {requested!r} of dataset {source} is not an image column ({features[requested]!r})"
            )
        return requested
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise DatasetPredictionError(f"dataset {source} has no image column (columns: {list(features)})")
    raise DatasetPredictionError(
        f"dataset {source} has several image columns {candidates}: choose one with --image_column"
    )


def _raw_rows(hf, source: str, split: str, image_column: str | None, streaming: bool) -> InputRows:
    import datasets

    if isinstance(hf, datasets.DatasetDict):
        if split not in hf:
            raise DatasetPredictionError(f"split {split!r} not in dataset {source} (splits: {list(hf)})")
        hf = hf[split]
    if streaming and isinstance(hf, datasets.Dataset):
        hf = hf.to_iterable_dataset()
    features = hf.features
    if features is None:
        raise DatasetPredictionError(
            f"the stream of dataset {source} does not declare its columns; load it without --streaming"
        )
    column = _choose_image_column(features, image_column, source)
    if isinstance(hf, datasets.Dataset) and len(hf) == 0:
        raise DatasetPredictionError(f"dataset {source} (split {split!r}) is empty")
    # rows are read undecoded: the stored bytes are kept as they are, and a broken image fails its row, not the run
    for name in _image_columns(features):
        hf = hf.cast_column(name, datasets.Image(decode=False))
    num_rows = len(hf) if isinstance(hf, datasets.Dataset) else None
    return InputRows(hf, source, column, False, datasets.Features(features), num_rows)


def _is_depth_dataset(path: Path) -> bool:
    from ..data.layouts import find_split_lists
    from ..data.nyu import find_nyu_layout

    return path.is_file() or find_nyu_layout(path) is not None or bool(find_split_lists(path)[0])


def open_input(
    source: str,
    *,
    split: str = "train",
    config_name: str | None = None,
    image_column: str | None = None,
    streaming: bool = False,
    depth_format: str = "png16",
) -> InputRows:
    """The rows of `source`: a `save_to_disk` folder, a depth dataset `load_depth_dataset` reads (list files, NYU
    layouts, `"synthetic"`), any other folder as an image folder, or a Hub dataset id (`datasets.load_dataset`).

    `depth_format` is how the ground-truth depth of a depth dataset is written. Every failure is one
    `DatasetPredictionError` line naming the source.
    """
    import datasets

    from ..data import SourceKind, classify_source, load_depth_dataset

    source = str(source)
    try:
        kind = classify_source(source)
    except ValueError as error:
        raise DatasetPredictionError(first_line(error)) from None
    if kind is SourceKind.MISSING:
        raise DatasetPredictionError(f"dataset folder or file not found: {source}")
    path = Path(source).expanduser()
    label = str(path.resolve()) if kind in (SourceKind.FILE, SourceKind.FOLDER) else source
    try:
        if kind is SourceKind.FOLDER and any((path / marker).is_file() for marker in _SAVED_DATASET_MARKERS):
            return _raw_rows(datasets.load_from_disk(str(path)), label, split, image_column, streaming)
        if kind is SourceKind.SYNTHETIC or (kind in (SourceKind.FILE, SourceKind.FOLDER) and _is_depth_dataset(path)):
            if image_column not in (None, "image"):
                raise DatasetPredictionError(
                    f"dataset {label} is a depth dataset: its image column is 'image', not {image_column!r}"
                )
            dataset = load_depth_dataset(source, split=split, streaming=streaming)
            kept = datasets.Features(
                {"image": datasets.Image(), "depth": depth_feature(depth_format), "name": datasets.Value("string")}
            )
            num_rows = len(dataset) if isinstance(dataset, datasets.Dataset) else None
            return InputRows(dataset, label, "image", True, kept, num_rows)
        if kind is SourceKind.FOLDER:
            hf = datasets.load_dataset("imagefolder", data_dir=str(path), split=split, streaming=streaming)
        else:
            hf = datasets.load_dataset(source, config_name, split=split, streaming=streaming)
        return _raw_rows(hf, label, split, image_column, streaming)
    except DatasetPredictionError:
        raise
    except Exception as error:  # datasets raises many types (FileNotFoundError, DatasetNotFoundError, ValueError...)
        raise DatasetPredictionError(f"cannot load dataset {label} (split {split!r}): {first_line(error)}") from None


def check_output_columns(rows: InputRows, depth_column: str, with_uncertainty: bool):
    """Refuse output column names the input already uses (its columns are kept as they are)."""
    taken = set(rows.columns)
    if depth_column in taken:
        raise DatasetPredictionError(
            f"dataset {rows.source} already has a column {depth_column!r}: name the predicted depth another way "
            "with --depth_column (e.g. predicted_depth)"
        )
    for name in (ROW_INDEX_COLUMN, UNCERTAINTY_COLUMN) if with_uncertainty else (ROW_INDEX_COLUMN,):
        if name in taken or name == depth_column:
            raise DatasetPredictionError(
                f"column name {name!r} is taken (dataset {rows.source} or --depth_column): the output needs it"
            )


# ------------------------------------------------------------------------------------------------
# Rows
# ------------------------------------------------------------------------------------------------


@dataclass
class PreparedRow:
    """One input row ready for the model: its kept values and decoded image, or why it cannot be used."""

    index: int
    values: dict | None = None
    image: Image.Image | None = None
    error: str | None = None


def _open_image_value(value) -> Image.Image:
    """A fully decoded PIL image from an undecoded `Image` value, EXIF orientation applied (as the image processor
    does); every failure is an `ImageLoadError` naming the file."""
    if isinstance(value, Image.Image):
        return value
    if not isinstance(value, dict) or (value.get("bytes") is None and not value.get("path")):
        raise ImageLoadError("no image in the row")
    if value.get("bytes") is None:
        return load_image_file(value["path"])
    return decode_image(io.BytesIO(value["bytes"]), value.get("path") or "image bytes")


def _embedded(value):
    """An undecoded `Image` value with the file's bytes in it, so that the output does not depend on input paths."""
    if isinstance(value, dict) and value.get("bytes") is None and value.get("path"):
        with open(value["path"], "rb") as handle:
            return {"bytes": handle.read(), "path": os.path.basename(value["path"])}
    return value


def _png_value(image: Image.Image) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    return {"bytes": buffer.getvalue(), "path": None}


def prepare_row(rows: InputRows, index: int, read: Callable[[], dict], depth_format: str) -> PreparedRow:
    """Read row `index` (`read()` returns it) and decode its image; an unreadable row becomes an error, not a crash."""
    try:
        row = read()
        if rows.decoded:
            image = row["image"]
            depth = encode_depth(row["depth"], depth_format)
            values = {"image": _png_value(image), "depth": depth, "name": row["name"]}
        else:
            image = _open_image_value(row[rows.image_column])
            image_names = set(_image_columns(rows.kept_features))
            values = {name: _embedded(row[name]) if name in image_names else row[name] for name in rows.columns}
        return PreparedRow(index, values, image)
    except Exception as error:  # any failure of one row (I/O, decoding, a dataset's own transform) is that row's
        return PreparedRow(index, error=first_line(error))


class IndexedRows(torch.utils.data.Dataset):
    """Rows `indices` of a map-style input, read and decoded in `DataLoader` workers."""

    def __init__(self, rows: InputRows, indices: Sequence[int], depth_format: str):
        self.rows, self.indices, self.depth_format = rows, list(indices), depth_format

    def __len__(self):
        return len(self.indices)

    def __getitem__(self, position: int) -> PreparedRow:
        index = self.indices[position]
        return prepare_row(self.rows, index, lambda: self.rows.dataset[index], self.depth_format)


# ------------------------------------------------------------------------------------------------
# Shards
# ------------------------------------------------------------------------------------------------


@dataclass
class ShardPlan:
    """Fixed shards of `shard_size` rows by row index; `num_rows` is None for a stream of unknown length."""

    shard_size: int
    num_rows: int | None

    @property
    def num_shards(self) -> int | None:
        return None if self.num_rows is None else math.ceil(self.num_rows / self.shard_size)

    def shard_of(self, index: int) -> int:
        return index // self.shard_size

    def rows(self, shard: int) -> range:
        stop = (shard + 1) * self.shard_size
        return range(shard * self.shard_size, stop if self.num_rows is None else min(stop, self.num_rows))

    def pending(self, completed: set[int]) -> list[int]:
        return [k for k in range(self.num_shards) if k not in completed]


def _fsync_directory(path: Path):
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # platforms without directory file descriptors
        return
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _shard_name(shard: int, suffix: str) -> str:
    return f"shard-{shard:05d}{suffix}"


class PredictionOutput:
    """The output folder of a run: its settings, complete shards, errors and summary (layout: module docstring)."""

    def __init__(self, output_dir: str | os.PathLike):
        self.root = Path(output_dir).expanduser()
        self.data_dir = self.root / DATA_DIR
        self.errors_dir = self.root / ERRORS_DIR
        self.incomplete_dir = self.root / INCOMPLETE_DIR

    # -- settings ------------------------------------------------------------------------------

    def check(self, settings: dict, overwrite: bool):
        """Refuse (one line) a folder that is a file, or that holds another run or other files, unless `overwrite`.
        Reads only: nothing is created or removed here."""
        if self.root.exists() and not self.root.is_dir():
            raise DatasetPredictionError(f"output folder {self.root} is a file")
        for parent in self.root.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise DatasetPredictionError(f"output folder {self.root} cannot be created: {parent} is a file")
                if not os.access(parent, os.W_OK) and not self.root.exists():
                    raise DatasetPredictionError(
                        f"output folder {self.root} cannot be created: {parent} is not writable"
                    )
                break
        if not self.root.is_dir() or overwrite:
            return
        settings_file = self.root / SETTINGS_FILE
        if settings_file.is_file():
            try:
                previous = json.loads(settings_file.read_text())
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
                raise DatasetPredictionError(
                    f"{settings_file} is unreadable ({first_line(error)}): pass --overwrite to start over"
                ) from None
            differences = [
                f"{key} {previous.get(key)!r} -> {value!r}"
                for key, value in settings.items()
                if previous.get(key) != value
            ]
            if differences:
                raise DatasetPredictionError(
                    f"output folder {self.root} holds a run with other settings ({'; '.join(differences)}): "
                    "choose another folder, or pass --overwrite to replace its results"
                )
        elif any(self.root.iterdir()):
            raise DatasetPredictionError(
                f"output folder {self.root} is not empty and holds no depth prediction run: choose an empty folder, "
                "or pass --overwrite to write into it"
            )

    def prepare(self, settings: dict, overwrite: bool):
        """Create the folder and record the settings (main process, after `check`). With `overwrite`, the results a
        run writes here are removed first; nothing else in the folder is touched."""
        if overwrite:
            for folder, pattern in ((self.data_dir, "shard-*.parquet"), (self.errors_dir, "shard-*.jsonl")):
                for path in folder.glob(pattern):
                    path.unlink()
            for name in (SUMMARY_FILE, ERRORS_FILE, CARD_FILE, SETTINGS_FILE):
                (self.root / name).unlink(missing_ok=True)
        for folder in (self.root, self.data_dir, self.errors_dir, self.incomplete_dir):
            folder.mkdir(parents=True, exist_ok=True)
        # a killed run leaves its half-written files here; they never count as results
        for path in self.incomplete_dir.iterdir():
            if path.is_file():
                path.unlink()
        self._write_atomic(self.root / SETTINGS_FILE, (json.dumps(settings, indent=2) + "\n").encode())

    # -- shards --------------------------------------------------------------------------------

    def completed_shards(self) -> set[int]:
        return {int(path.name[len("shard-"):-len(".parquet")]) for path in self.data_dir.glob("shard-*.parquet")}

    def shard_files(self) -> list[Path]:
        return sorted(self.data_dir.glob("shard-*.parquet"))

    def _write_atomic(self, path: Path, data: bytes | None = None, write: Callable[[Path], None] | None = None):
        """Write `path` through a file in `.incomplete/` that is synced, then renamed over it: readers see the
        whole file or none, even after a crash or power loss."""
        self.incomplete_dir.mkdir(parents=True, exist_ok=True)
        temporary = self.incomplete_dir / f"{path.name}.{os.getpid()}"
        if write is not None:
            write(temporary)
        else:
            temporary.write_bytes(data)
        with open(temporary, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temporary, path)
        _fsync_directory(path.parent)

    def commit(self, shard: int, columns: dict[str, list], features, errors: list[dict]):
        """Write shard `shard` (its rows as `columns`, in `features`) and its errors. The errors file comes first:
        a shard whose Parquet file exists is complete, errors included."""
        import datasets

        errors_path = self.errors_dir / _shard_name(shard, ".jsonl")
        if errors:
            self._write_atomic(errors_path, "".join(json.dumps(error) + "\n" for error in errors).encode())
        else:
            errors_path.unlink(missing_ok=True)
        table = datasets.Dataset.from_dict(columns, features=features)
        self._write_atomic(
            self.data_dir / _shard_name(shard, ".parquet"), write=lambda path: table.to_parquet(str(path))
        )

    # -- end of a run --------------------------------------------------------------------------

    def errors(self) -> list[dict]:
        found = []
        for path in sorted(self.errors_dir.glob("shard-*.jsonl")):
            if (self.data_dir / path.name.replace(".jsonl", ".parquet")).is_file():
                found.extend(json.loads(line) for line in path.read_text().splitlines() if line.strip())
        return sorted(found, key=lambda error: error[ROW_INDEX_COLUMN])

    def written_rows(self) -> int:
        import pyarrow.parquet as pq

        return sum(pq.read_metadata(path).num_rows for path in self.shard_files())

    def finalize(self, summary: dict, errors: list[dict]):
        """Write errors.jsonl, summary.json and the dataset card once every shard is complete."""
        self._write_atomic(self.root / ERRORS_FILE, "".join(json.dumps(error) + "\n" for error in errors).encode())
        self._write_atomic(self.root / SUMMARY_FILE, (json.dumps(summary, indent=2) + "\n").encode())
        card = (
            "---\nconfigs:\n- config_name: default\n  data_files:\n  - split: train\n    path: data/*.parquet\n---\n\n"
            f"Depth predicted by `{summary['settings']['model']}` for `{summary['settings']['dataset']}` "
            f"(split `{summary['settings']['split']}`): {summary['written_rows']} rows, "
            f"{summary['error_rows']} unreadable rows listed in `{ERRORS_FILE}`.\n"
        )
        self._write_atomic(self.root / CARD_FILE, card.encode())


def push_folder_to_hub(output: PredictionOutput, repo_id: str, private: bool = False) -> str:
    """Upload the shards, errors, summary and card of a finished run as the dataset repository `repo_id`."""
    from huggingface_hub import HfApi

    api = HfApi()
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    commit = api.upload_folder(
        repo_id=repo_id,
        repo_type="dataset",
        folder_path=str(output.root),
        allow_patterns=[f"{DATA_DIR}/*.parquet", ERRORS_FILE, SUMMARY_FILE, CARD_FILE],
        commit_message="Add predicted depth",
    )
    return getattr(commit, "repo_url", None) or f"https://huggingface.co/datasets/{repo_id}"


# ------------------------------------------------------------------------------------------------
# The prediction loop of one process
# ------------------------------------------------------------------------------------------------


@dataclass
class ShardPredictor:
    """Predicts depth for a process's rows (in row order) and commits each shard when its last row is done."""

    model: Any
    image_processor: Any
    rows: InputRows
    output: PredictionOutput
    depth_column: str
    depth_format: str
    batch_size: int
    with_uncertainty: bool
    on_progress: Callable[[int], None] = lambda rows_in_open_shard: None
    shards_written: int = field(default=0, init=False)
    rows_written: int = field(default=0, init=False)
    rows_failed: int = field(default=0, init=False)
    _batch: list = field(default_factory=list, init=False, repr=False)  # rows waiting for the model
    _done: list = field(default_factory=list, init=False, repr=False)  # rows of the open shard, predicted
    _shard: int | None = field(default=None, init=False, repr=False)  # the open shard

    @cached_property
    def features(self):
        import datasets

        features = dict(self.rows.kept_features)
        features[ROW_INDEX_COLUMN] = datasets.Value("int64")
        features[self.depth_column] = depth_feature(self.depth_format)
        if self.with_uncertainty:
            features[UNCERTAINTY_COLUMN] = depth_feature(self.depth_format)
        return datasets.Features(features)

    def run(self, prepared: Iterable[PreparedRow], shard_of: Callable[[int], int]):
        for row in prepared:
            shard = shard_of(row.index)
            if shard != self._shard:
                self._finish_shard()
                self._shard = shard
            self._batch.append(row)
            if len(self._batch) == self.batch_size:
                self._predict_batch()
        self._finish_shard()

    def _finish_shard(self):
        self._predict_batch()
        if self._shard is None:
            return
        names = list(self.features)
        columns = {name: [] for name in names}
        errors = []
        for row in self._done:
            if row.error is not None:
                errors.append({ROW_INDEX_COLUMN: row.index, "reason": row.error})
                continue
            for name, value in row.values.items():
                columns[name].append(value)
        self.output.commit(self._shard, columns, self.features, errors)
        self.shards_written += 1
        self.rows_written += len(self._done) - len(errors)
        self.rows_failed += len(errors)
        self._done, self._shard = [], None
        self.on_progress(0)

    @torch.no_grad()
    def _predict_batch(self):
        if not self._batch:
            return
        device, dtype = _device_dtype(self.model)
        ready, pixels = [], []
        for row in self._batch:
            if row.error is None:
                try:  # one image the processor refuses (too small, odd mode) fails its row only
                    pixels.append(self.image_processor(row.image, return_tensors="pt")["pixel_values"])
                    ready.append(row)
                except (ValueError, TypeError, OSError) as error:
                    row.error = first_line(error)
        if ready:
            outputs = self.model(pixel_values=torch.cat(pixels).to(device=device, dtype=dtype))
            sizes = [(row.image.height, row.image.width) for row in ready]
            depths = self.image_processor.post_process_depth_estimation(
                {"predicted_depth": outputs.predicted_depth.float()}, sizes
            )
            uncertainty = getattr(outputs, "depth_uncertainty", None)
            if self.with_uncertainty:
                # the same resizing as the depth: the image processor's
                uncertainty = self.image_processor.post_process_depth_estimation(
                    {"predicted_depth": uncertainty.float()}, sizes
                )
            for position, row in enumerate(ready):
                row.values[ROW_INDEX_COLUMN] = row.index
                depth = depths[position]["predicted_depth"].cpu().numpy()
                row.values[self.depth_column] = encode_depth(depth, self.depth_format)
                if self.with_uncertainty:
                    row.values[UNCERTAINTY_COLUMN] = encode_depth(
                        uncertainty[position]["predicted_depth"].cpu().numpy(), self.depth_format
                    )
                row.image = None  # the decoded pixels are not needed any more
        self._done.extend(self._batch)
        self._batch = []
        self.on_progress(len(self._done))


def map_style_rows(rows: InputRows, shards: Sequence[int], plan: ShardPlan, depth_format: str, batch_size: int,
                   num_workers: int) -> Iterator[PreparedRow]:
    """The rows of `shards`, in order, read and decoded by `num_workers` DataLoader workers.

    Batches never cross a shard boundary, so a row meets the same batch whatever the number of processes."""
    indices, batches = [], []
    for shard in shards:
        start = len(indices)
        indices.extend(plan.rows(shard))
        stop = len(indices)
        batches.extend(list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size))
    loader = torch.utils.data.DataLoader(
        IndexedRows(rows, indices, depth_format), batch_sampler=batches, num_workers=num_workers, collate_fn=list
    )
    for batch in loader:
        yield from batch


def stream_rows(rows: InputRows, plan: ShardPlan, completed: set[int], depth_format: str, num_processes: int,
                take: Callable[[list[int]], list[int]], counter: dict) -> Iterator[PreparedRow]:
    """This process's rows of a stream: the stream is read in windows of `num_processes` shards, and each window's
    shards still to do are split between processes by `take` (`split_between_processes`). Only the rows kept are
    decoded; `counter["rows"]` ends as the stream's length."""
    mine: set[int] = set()
    window = -1
    count = 0
    for index, row in enumerate(rows.dataset):
        count = index + 1
        shard = plan.shard_of(index)
        if shard // num_processes != window:
            window = shard // num_processes
            todo = [k for k in range(window * num_processes, (window + 1) * num_processes) if k not in completed]
            mine = set(take(todo))
        if shard in mine:
            yield prepare_row(rows, index, lambda row=row: row, depth_format)
    counter["rows"] = count


class SharedProgress:
    """A progress bar (shown by the main process) over the rows of all processes: the shards that became complete on
    disk since the start, plus this process's rows of the shard it has open. Its rate is images/s across processes."""

    def __init__(self, output: PredictionOutput, plan: ShardPlan, completed_before: set[int], enabled: bool):
        from tqdm.auto import tqdm

        total = None if plan.num_rows is None else sum(len(plan.rows(k)) for k in plan.pending(completed_before))
        self.output, self.plan, self.before, self.enabled = output, plan, set(completed_before), enabled
        self.bar = tqdm(total=total, unit="img", desc="depth", disable=not enabled, dynamic_ncols=True)
        self.open_rows, self.disk_rows, self.polled = 0, 0, 0.0

    def update(self, rows_in_open_shard: int):
        self.open_rows = rows_in_open_shard
        self.refresh(poll=rows_in_open_shard == 0)

    def refresh(self, poll: bool = False):
        if not self.enabled:
            return
        if poll or time.monotonic() - self.polled > 0.5:
            new = self.output.completed_shards() - self.before
            self.disk_rows = sum(len(self.plan.rows(k)) for k in new)
            self.polled = time.monotonic()
        self.bar.update(max(0, self.disk_rows + self.open_rows - self.bar.n))

    def wait_for(self, shards: Iterable[int], num_rows: int | None = None, interval: float = 0.5):
        """Keep the bar moving until `shards` are complete (the other processes' work), then close it. `num_rows`:
        the length of a stream, known once read (its last shard may be short)."""
        if num_rows is not None:
            self.plan = ShardPlan(self.plan.shard_size, num_rows)
        shards = set(shards)
        while self.enabled and not shards <= self.output.completed_shards():
            self.refresh(poll=True)
            time.sleep(interval)
        self.open_rows = 0
        self.refresh(poll=True)
        if self.enabled:  # exact at the end (a stream's last shard was counted in full before its length was known)
            self.bar.n = self.disk_rows
            self.bar.refresh()
        self.bar.close()
