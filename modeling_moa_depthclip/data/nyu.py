"""NYU Depth V2 in the forms it is published in, read in place.

* fast-depth `.h5` frames (`rgb`: uint8 (3, H, W), `depth`: float32 (H, W) metres), in a folder tree
  (`train/<scene>/<n>.h5`, `val/official/<n>.h5`) or in `.tar` shards (`train-000000.tar`, `val-000000.tar`: the
  files of the Hub's `sayakpaul/nyu_depth_v2`). Shards are indexed member by member and read at their offsets
  (map-style) or streamed member by member (`streaming=True`); nothing is extracted.
* DenseDepth's Eigen test arrays (`eigen_test_rgb.npy`: uint8 (N, H, W, 3), `eigen_test_depth.npy`: float32 (N, H, W)
  metres, `eigen_test_crop.npy`: DenseDepth's evaluation crop, not applied here since the evaluation picks its
  crop), as `nyu_test.zip` or as the files in a folder. Files and members stored without compression are
  memory-mapped; compressed members are read frame by frame.

Splits: a folder tree's top folders and a shard's name prefix name them (`train`; `val` is `validation`); DenseDepth's
arrays are the `test` split.
"""

from __future__ import annotations

import io
import logging
import os
import re
import tarfile
import zipfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import datasets
import h5py
import huggingface_hub
import numpy as np

from .decoding import DepthExampleDecoder, Example
from .layouts import normalise_split, split_error

__all__ = [
    "DENSEDEPTH_ARRAYS",
    "DenseDepthArraysDecoder",
    "FastDepthH5Decoder",
    "NpyFrames",
    "fastdepth_h5_dataset",
    "find_nyu_layout",
    "index_tar_shard",
    "read_fastdepth_h5",
    "split_of_shard",
]

logger = logging.getLogger(__name__)

DENSEDEPTH_ARRAYS = ("eigen_test_rgb.npy", "eigen_test_depth.npy", "eigen_test_crop.npy")
DENSEDEPTH_ZIP = "nyu_test.zip"
_SHARD = re.compile(r"^(?P<split>[A-Za-z]+)-\d+\.tar$")


def _split_word(word: str) -> str:
    return normalise_split(word.lower())


def split_of_shard(filename: str) -> str | None:
    """`train-000003.tar` -> `train`, `val-000000.tar` -> `validation`; None for other names."""
    match = _SHARD.match(Path(filename).name)
    return _split_word(match["split"]) if match else None


# ---------------------------------------------------------------------------------------------
# fast-depth h5 frames
# ---------------------------------------------------------------------------------------------


def read_fastdepth_h5(source: str | os.PathLike | bytes, where: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`(rgb uint8 [H, W, 3], depth [H, W] as stored)` of one fast-depth `.h5` frame (a path or the file's bytes)."""
    where = where or (os.fspath(source) if not isinstance(source, bytes) else "h5 frame")
    handle = io.BytesIO(source) if isinstance(source, bytes) else os.fspath(source)
    try:
        with h5py.File(handle, "r") as h5:
            missing = [key for key in ("rgb", "depth") if key not in h5]
            if missing:
                raise ValueError(f"{where}: no {' or '.join(map(repr, missing))} dataset (keys: {sorted(h5.keys())})")
            rgb, depth = np.asarray(h5["rgb"]), np.asarray(h5["depth"])
    except (OSError, KeyError) as exc:
        raise OSError(f"cannot read h5 frame {where}: {exc}") from exc
    if rgb.ndim != 3 or rgb.shape[0] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{where}: 'rgb' must be uint8 (3, H, W), got {rgb.dtype} {rgb.shape}")
    if depth.ndim != 2 or depth.shape != rgb.shape[1:]:
        raise ValueError(f"{where}: 'depth' must be (H, W) = {rgb.shape[1:]}, got {depth.shape}")
    return np.transpose(rgb, (1, 2, 0)), depth


def index_tar_shard(path: str | os.PathLike) -> list[tuple[str, int, int]]:
    """`[(member name, data offset, size)]` of the `.h5` members of an uncompressed tar, in archive order."""
    path = os.fspath(path)
    try:
        with tarfile.open(path, "r:") as tar:  # headers only: member data is skipped by seeking
            return [(m.name, m.offset_data, m.size) for m in tar if m.isfile() and m.name.endswith(".h5")]
    except tarfile.TarError as exc:
        raise OSError(f"cannot read tar shard {path}: {exc}") from exc


def _read_at(path: str, offset: int, size: int) -> bytes:
    with open(path, "rb") as handle:
        handle.seek(offset)
        data = handle.read(size)
    if len(data) != size:
        raise OSError(f"{path}: truncated at byte {offset + len(data)} (member needs {size} bytes from {offset})")
    return data


def _member_name(member: str) -> str:
    return re.sub(r"\.h5$", "", member.lstrip("./"))


class FastDepthH5Decoder(DepthExampleDecoder):
    """Rows naming an `.h5` frame (`path`; or `shard`, `offset`, `size` in a tar; or its bytes `h5`) -> examples."""

    def decode(self, row: Mapping[str, Any]) -> Example:
        if row.get("path"):
            source, where = row["path"], row["path"]
        elif row.get("h5") is not None:
            source, where = row["h5"], f"{self.source} [{row['name']}]"
        else:
            where = f"{row['shard']}:{row['name']}.h5"
            source = _read_at(row["shard"], int(row["offset"]), int(row["size"]))
        rgb, raw_depth = read_fastdepth_h5(source, where)
        return self.finish(rgb, raw_depth, row["name"], where)


def _list_h5(folder: Path) -> list[Path]:
    return sorted(folder.rglob("*.h5"))


def fastdepth_h5_dataset(files: Sequence[Path], root: Path, *, source: str, **decoder_kwargs):
    """A lazily decoded `datasets.Dataset` over fast-depth `.h5` files (names: paths relative to `root`)."""
    table = datasets.Dataset.from_dict({
        "path": [str(f) for f in files],
        "name": [f.relative_to(root).with_suffix("").as_posix() for f in files],
    })
    return table.with_transform(FastDepthH5Decoder(source=source, **decoder_kwargs))


def tar_shards_dataset(shards: Sequence[str | os.PathLike], *, source: str, streaming: bool = False, **decoder_kwargs):
    """fast-depth `.h5` frames in tar shards, read in place: a map-style `datasets.Dataset` over the members'
    offsets, or (`streaming`) a `datasets.IterableDataset` reading each shard member by member."""
    shards = [os.fspath(s) for s in shards]
    decoder = FastDepthH5Decoder(source=source, **decoder_kwargs)
    if streaming:
        stream = datasets.IterableDataset.from_generator(_stream_tar_members, gen_kwargs={"shards": shards})
        return stream.map(decoder.decode, remove_columns=["h5"])
    columns: dict[str, list] = {"shard": [], "offset": [], "size": [], "name": []}
    for shard in shards:
        for member, offset, size in index_tar_shard(shard):
            columns["shard"].append(shard)
            columns["offset"].append(offset)
            columns["size"].append(size)
            columns["name"].append(_member_name(member))
    if not columns["name"]:
        raise ValueError(f"no .h5 frames in the tar shards of {source} ({', '.join(shards)})")
    return datasets.Dataset.from_dict(columns).with_transform(decoder)


def _open_shard(shard: str):
    if shard.startswith("hf://"):
        return huggingface_hub.HfFileSystem().open(shard[len("hf://"):], "rb")
    return open(shard, "rb")


def _stream_tar_members(shards: Sequence[str]):
    for shard in shards:
        with _open_shard(shard) as handle, tarfile.open(fileobj=handle, mode="r|") as tar:
            for member in tar:
                if member.isfile() and member.name.endswith(".h5"):
                    yield {"h5": tar.extractfile(member).read(), "name": _member_name(member.name)}


# ---------------------------------------------------------------------------------------------
# DenseDepth's Eigen test arrays
# ---------------------------------------------------------------------------------------------


class NpyFrames:
    """Frames `array[i]` of a `.npy` file or of a `.npy` member of a zip, without loading the whole array.

    A file, or a member stored without compression, is memory-mapped; a compressed member is decompressed frame by
    frame through a seekable stream (sequential reads cost one pass). Handles are opened lazily in each process.
    """

    def __init__(self, path: str | os.PathLike, member: str | None = None):
        self.path, self.member = os.fspath(path), member
        self.where = f"{self.path}:{member}" if member else self.path
        self._array = self._stream = None
        self.shape, self.dtype, self.fortran, self._data_offset, self.compressed = self._read_header()

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_array"] = state["_stream"] = None
        return state

    def _read_header(self):
        with self._open_raw() as handle:
            try:
                version = np.lib.format.read_magic(handle)
                read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                shape, fortran, dtype = read_header(handle)
            except ValueError as exc:
                raise ValueError(f"{self.where} is not a .npy array: {exc}") from exc
            header_end = handle.tell()
        if dtype.hasobject:
            raise ValueError(f"{self.where}: object arrays are not read (dtype {dtype})")
        compressed = False
        data_offset = header_end
        if self.member is not None:
            with zipfile.ZipFile(self.path) as archive:
                info = archive.getinfo(self.member)
                compressed = info.compress_type != zipfile.ZIP_STORED
                if not compressed:
                    data_offset += _zip_member_data_offset(self.path, info)
        return tuple(shape), dtype, fortran, data_offset, compressed

    def _open_raw(self):
        if self.member is None:
            return open(self.path, "rb")
        archive = zipfile.ZipFile(self.path)
        try:
            return _ClosingMember(archive, archive.open(self.member))
        except KeyError:
            archive.close()
            raise ValueError(f"{self.path} has no member {self.member}") from None

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index: int) -> np.ndarray:
        if not 0 <= index < len(self):
            raise IndexError(f"frame {index} out of range for {self.where} ({len(self)} frames)")
        if self.fortran:
            raise ValueError(f"{self.where}: Fortran-ordered arrays are not read frame by frame")
        if not self.compressed:
            if self._array is None:
                self._array = np.memmap(self.path, dtype=self.dtype, mode="r", offset=self._data_offset, shape=self.shape)
            return np.array(self._array[index])
        frame_shape = self.shape[1:]
        frame_bytes = int(np.prod(frame_shape)) * self.dtype.itemsize
        if self._stream is None:
            self._stream = self._open_raw()
        self._stream.seek(self._data_offset + index * frame_bytes)
        data = self._stream.read(frame_bytes)
        if len(data) != frame_bytes:
            raise OSError(f"{self.where}: truncated at frame {index}")
        return np.frombuffer(data, dtype=self.dtype).reshape(frame_shape).copy()


class _ClosingMember(io.RawIOBase):
    """A zip member's stream that also closes its archive."""

    def __init__(self, archive: zipfile.ZipFile, stream):
        self.archive, self.stream = archive, stream

    def read(self, size: int = -1) -> bytes:
        return self.stream.read(size)

    def readinto(self, buffer) -> int:
        data = self.stream.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        return self.stream.seek(offset, whence)

    def tell(self) -> int:
        return self.stream.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def close(self) -> None:
        self.stream.close()
        self.archive.close()
        super().close()


def _zip_member_data_offset(path: str, info: zipfile.ZipInfo) -> int:
    """Where a member's data starts: after its local header, whose name and extra lengths may differ from the
    central directory's."""
    with open(path, "rb") as handle:
        handle.seek(info.header_offset)
        header = handle.read(30)
    if header[:4] != b"PK\x03\x04":
        raise ValueError(f"{path}: bad local header for {info.filename}")
    name_length = int.from_bytes(header[26:28], "little")
    extra_length = int.from_bytes(header[28:30], "little")
    return info.header_offset + 30 + name_length + extra_length


class DenseDepthArraysDecoder(DepthExampleDecoder):
    """Rows `{"index", "name"}` -> examples from DenseDepth's `eigen_test_rgb` / `eigen_test_depth` arrays."""

    def __init__(self, rgb: NpyFrames, depth: NpyFrames, **kwargs):
        super().__init__(**kwargs)
        self.rgb, self.depth = rgb, depth

    def decode(self, row: Mapping[str, Any]) -> Example:
        index = int(row["index"])
        where = f"{self.depth.where}[{index}]"
        return self.finish(self.rgb[index], self.depth[index], row["name"], where)


def densedepth_arrays_dataset(source: Path, *, split: str, **decoder_kwargs):
    """DenseDepth's Eigen test arrays (`nyu_test.zip` or a folder with the `.npy` files) as a lazily read
    `datasets.Dataset` (the `test` split)."""
    if normalise_split(split) != "test":
        raise split_error(split, str(source), ["test"])
    if source.is_file():
        with zipfile.ZipFile(source) as archive:
            names = {Path(n).name: n for n in archive.namelist()}
        missing = [n for n in DENSEDEPTH_ARRAYS[:2] if n not in names]
        if missing:
            raise ValueError(f"{source} has no {' or '.join(missing)} (members: {sorted(names)[:10]})")
        rgb, depth = NpyFrames(source, names[DENSEDEPTH_ARRAYS[0]]), NpyFrames(source, names[DENSEDEPTH_ARRAYS[1]])
    else:
        rgb, depth = NpyFrames(source / DENSEDEPTH_ARRAYS[0]), NpyFrames(source / DENSEDEPTH_ARRAYS[1])
    if len(rgb.shape) != 4 or rgb.shape[-1] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"{rgb.where}: expected uint8 (N, H, W, 3), got {rgb.dtype} {rgb.shape}")
    if len(depth.shape) != 3 or depth.shape != rgb.shape[:3]:
        raise ValueError(f"{depth.where}: expected (N, H, W) = {rgb.shape[:3]}, got {depth.shape}")
    how = "decompressed frame by frame" if rgb.compressed or depth.compressed else "memory-mapped"
    logger.info(f"{source}: DenseDepth Eigen test arrays, {len(rgb)} frames of {rgb.shape[1]}x{rgb.shape[2]}, {how}")
    table = datasets.Dataset.from_dict(
        {"index": list(range(len(rgb))), "name": [f"eigen_test_{i:05d}" for i in range(len(rgb))]}
    )
    return table.with_transform(DenseDepthArraysDecoder(rgb, depth, source=str(source), **decoder_kwargs))


# ---------------------------------------------------------------------------------------------
# Layout detection
# ---------------------------------------------------------------------------------------------


def find_nyu_layout(path: Path) -> str | None:
    """"densedepth_arrays", "tar_shards" or "fastdepth_h5" for a file or folder in one of those forms, else None."""
    if path.is_file():
        if path.suffix.lower() == ".zip":
            return "densedepth_arrays"
        if path.suffix.lower() == ".tar":
            return "tar_shards"
        return None
    if (path / DENSEDEPTH_ARRAYS[0]).is_file() or (path / DENSEDEPTH_ZIP).is_file():
        return "densedepth_arrays"
    if _shards_in(path):
        return "tar_shards"
    if _h5_split_folders(path):
        return "fastdepth_h5"
    return None


def _shards_in(folder: Path) -> dict[str, list[Path]]:
    by_split: dict[str, list[Path]] = {}
    for base in (folder, folder / "data"):
        for shard in sorted(base.glob("*.tar")) if base.is_dir() else ():
            split = split_of_shard(shard.name)
            if split:
                by_split.setdefault(split, []).append(shard)
        if by_split:
            break
    return by_split


def _h5_split_folders(folder: Path) -> dict[str, Path]:
    for base in (folder, folder / "nyudepthv2"):
        if not base.is_dir():
            continue
        found = {
            _split_word(child.name): child
            for child in sorted(base.iterdir())
            if child.is_dir() and child.name.lower() in ("train", "val", "validation", "test")
            and next(child.rglob("*.h5"), None) is not None
        }
        if found:
            return found
    return {}


def load_nyu_layout(path: Path, layout: str, split: str, *, streaming: bool, **decoder_kwargs):
    """The `split` of a NYU file or folder in `layout` (see `find_nyu_layout`)."""
    source = str(path)
    if layout == "densedepth_arrays":
        if path.is_dir() and not (path / DENSEDEPTH_ARRAYS[0]).is_file():
            path = path / DENSEDEPTH_ZIP
        return densedepth_arrays_dataset(path, split=split, **decoder_kwargs)
    if layout == "tar_shards":
        if path.is_file():
            return tar_shards_dataset([path], source=source, streaming=streaming, **decoder_kwargs)
        shards = _shards_in(path)
        wanted = normalise_split(split)
        if wanted not in shards:
            raise split_error(split, source, sorted(shards))
        return tar_shards_dataset(shards[wanted], source=source, streaming=streaming, **decoder_kwargs)
    folders = _h5_split_folders(path)
    wanted = normalise_split(split)
    if wanted not in folders:
        raise split_error(split, source, sorted(folders))
    files = _list_h5(folders[wanted])
    return fastdepth_h5_dataset(files, folders[wanted].parent, source=source, **decoder_kwargs)
