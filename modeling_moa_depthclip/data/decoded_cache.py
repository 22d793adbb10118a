"""Decode once: a file dataset's decoded frames kept as memory-mapped `.npy` arrays on disk.

Decoding a PNG or `.h5` frame is most of what a training example costs once augmentation runs at the model input
size; reading the same frame back from a memory-mapped `.npy` file is several times cheaper (BENCHMARKS.md,
section 8), and the pages are shared by all loader workers through the page cache, so memory stays flat.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from PIL import Image

from .decoding import DepthExampleDecoder

__all__ = ["DecodedFrames"]

_CACHE_FORMAT = 1


def _file_stats(value: Any, found: list) -> None:
    """(path, size, mtime) of every existing file a stored row names (nested `{"path": ...}` values included)."""
    if isinstance(value, Mapping):
        for item in value.values():
            _file_stats(item, found)
    elif isinstance(value, (str, os.PathLike)) and value:
        try:
            stat = os.stat(value)
        except (OSError, ValueError):
            return
        if os.path.isfile(value):
            found.append((os.path.abspath(value), stat.st_size, stat.st_mtime_ns))


class DecodedFrames(torch.utils.data.Dataset):
    """Map-style view of a file dataset of `load_depth_dataset` whose frames are decoded once into `cache_dir`.

    Each frame is stored as it was decoded (RGB uint8 and depth float32 metres, after the unit rule and depth range)
    in a folder named by a hash of the files its row names (path, size, modification time), its other stored
    values and the decoding settings: a changed file or setting is decoded anew, never served stale. A frame is
    decoded the first time it is read (the first epoch, or :meth:`prepare`) and written to a temporary folder that is
    renamed into place, so an interrupted write is never taken for a complete one. Reads are memory-mapped.
    """

    def __init__(self, dataset, cache_dir: str | os.PathLike):
        transform = (getattr(dataset, "format", None) or {}).get("format_kwargs", {}).get("transform")
        if not isinstance(transform, DepthExampleDecoder) or transform.transform is not None:
            raise ValueError(
                "a decoded-frame cache needs a map-style dataset of load_depth_dataset without an example transform "
                f"(got {type(dataset).__name__}); augment after the cache, e.g. with TrainingExamples"
            )
        self.decoder, self.rows = transform, dataset.with_format(None)
        self.cache_dir = Path(cache_dir).expanduser()
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=self.cache_dir).close()
        except OSError as exc:
            raise OSError(f"decoded-frame cache folder {self.cache_dir} cannot be written: {exc}") from None
        # every setting of the decoder (unit, scale, depth range, columns; a subclass's own) is part of the key
        self._settings = {key: value for key, value in vars(transform).items()
                          if not key.startswith("_") and isinstance(value, (str, int, float, bool, type(None)))}
        self._settings.update(decoder=type(transform).__qualname__, format=_CACHE_FORMAT)

    def __len__(self) -> int:
        return len(self.rows)

    def entry(self, index: int) -> Path:
        """The folder of frame `index`'s decoded arrays (present once it was decoded)."""
        row = self.rows[int(index)]
        files: list = []
        _file_stats(row, files)
        values = {key: value for key, value in row.items() if not isinstance(value, (bytes, Mapping))}
        blobs = [hashlib.sha256(value).hexdigest() for value in row.values() if isinstance(value, bytes)]
        key = json.dumps([self._settings, files, values, blobs], sort_keys=True, default=str)
        return self.cache_dir / hashlib.sha256(key.encode()).hexdigest()[:32]

    def _read(self, entry: Path) -> dict | None:
        try:
            rgb = np.load(entry / "rgb.npy", mmap_mode="r")
            depth = np.load(entry / "depth.npy", mmap_mode="r")
            name = (entry / "name.txt").read_text(encoding="utf-8")
        except (OSError, ValueError, EOFError):  # absent, or damaged after it was written
            return None
        # the image is copied by PIL; the depth is copied too, so examples are writable as decoded ones are
        return {"image": Image.fromarray(rgb), "depth": np.array(depth), "name": name}

    def _write(self, index: int, entry: Path) -> dict:
        example = self.decoder.decode(self.rows[int(index)])
        staging = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=self.cache_dir))
        try:
            np.save(staging / "rgb.npy", np.asarray(example["image"], dtype=np.uint8))
            np.save(staging / "depth.npy", np.asarray(example["depth"]))
            (staging / "name.txt").write_text(example["name"], encoding="utf-8")
            try:
                os.rename(staging, entry)
            except OSError:  # written meanwhile by another worker (or an unreadable leftover: replace it)
                if self._read(entry) is None:
                    shutil.rmtree(entry, ignore_errors=True)
                    os.rename(staging, entry)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        return example

    def __getitem__(self, index: int) -> dict:
        entry = self.entry(index)
        cached = self._read(entry)
        return cached if cached is not None else self._write(index, entry)

    def prepare(self, progress: bool = True) -> "DecodedFrames":
        """Decode every frame not yet in the cache (with a progress bar)."""
        from tqdm.auto import tqdm

        for index in tqdm(range(len(self)), desc=f"decoding frames into {self.cache_dir}", disable=not progress):
            entry = self.entry(index)
            if self._read(entry) is None:
                self._write(index, entry)
        return self
