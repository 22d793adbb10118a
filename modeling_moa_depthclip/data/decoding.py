"""The decoding transform: stored rows (files, arrays, `datasets` columns) -> example dicts."""

from __future__ import annotations

import io
import warnings
from typing import Any, Callable, Mapping, Sequence

import numpy as np
from PIL import Image

from .reading import DepthUnitWarning, depth_image_array, depth_scale_for, depth_to_metres, depth_unit_problem, make_example

__all__ = ["DepthExampleDecoder", "Example"]

Example = dict  # {"image": PIL.Image RGB, "depth": float32 [H, W] metres (0 = invalid), "name": str}


def _open_stored_image(value: Any, where: str):
    """A PIL image from a decoded or undecoded (`{"bytes", "path"}`) `Image` value."""
    if isinstance(value, Mapping) and ("bytes" in value or "path" in value):
        try:
            image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
            image.load()
        except Exception as exc:
            raise OSError(f"{where}: cannot read image {value.get('path') or '(bytes)'}: {exc}") from exc
        return image
    return value


class DepthExampleDecoder:
    """Batch transform (for `Dataset.with_transform`) turning stored rows into depth examples.

    `image_column` holds the RGB image and `depth_column` the depth in stored units (an image, array or nested
    list), converted by the unit rule of `modeling_moa_depthclip.data.reading`; `name_column` names the frame.
    Pixels outside `[min_depth, max_depth]` become 0 (None: no clipping). `transform` is applied to each decoded
    example (e.g. a `DepthAugmentation`). The first frame whose values contradict their unit raises one
    `DepthUnitWarning` for the dataset.
    """

    def __init__(
        self,
        image_column: str = "image",
        depth_column: str = "depth",
        name_column: str = "name",
        *,
        depth_unit: str | None = None,
        depth_scale: float | None = None,
        min_depth: float | None = None,
        max_depth: float | None = None,
        source: str = "dataset",
        transform: Callable[[Example], Example] | None = None,
    ):
        self.image_column, self.depth_column, self.name_column = image_column, depth_column, name_column
        self.depth_unit, self.depth_scale = depth_unit, depth_scale
        self.min_depth, self.max_depth, self.source, self.transform = min_depth, max_depth, source, transform
        self._warned = False

    def then(self, transform: Callable[[Example], Example] | None) -> "DepthExampleDecoder":
        """A copy that also applies `transform` to each decoded example."""
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        new.transform = transform if self.transform is None or transform is None else _Chain(self.transform, transform)
        return new

    def _where(self, row: Mapping[str, Any]) -> str:
        depth = row.get(self.depth_column)
        path = getattr(depth, "filename", None) or (depth.get("path") if isinstance(depth, Mapping) else None)
        return f"{self.source} [{row.get(self.name_column)}]" + (f" ({path})" if path else "")

    def decode(self, row: Mapping[str, Any]) -> Example:
        where = self._where(row)
        image = _open_stored_image(row[self.image_column], where)
        depth_value = _open_stored_image(row[self.depth_column], where)
        if hasattr(depth_value, "getbands"):  # a PIL image
            depth_value = depth_image_array(depth_value, where)
        image_path = getattr(image, "filename", None)
        return self.finish(image, depth_value, row[self.name_column], where + (f" (image {image_path})" if image_path else ""))

    def finish(self, image: Any, raw_depth: Any, name: Any, where: str) -> Example:
        """The example of an RGB image and a depth map in stored units: unit rule, range, checks, `transform`."""
        raw = np.asarray(raw_depth)
        metres = depth_to_metres(raw, self.depth_unit, self.depth_scale, where=where, warn=False)
        if not self._warned:
            unit = depth_scale_for(raw.dtype, self.depth_unit, self.depth_scale)[1]
            problem = depth_unit_problem(metres, unit, where)
            if problem:
                self._warned = True
                warnings.warn(f"{problem} (later frames of this dataset are not reported)", DepthUnitWarning, stacklevel=3)
        example = make_example(image, metres, str(name), min_depth=self.min_depth, max_depth=self.max_depth, source=where)
        return self.transform(example) if self.transform is not None else example

    def __call__(self, batch: Mapping[str, Sequence[Any]]) -> dict[str, list]:
        size = len(next(iter(batch.values())))
        examples = [self.decode({key: values[i] for key, values in batch.items()}) for i in range(size)]
        return {key: [example[key] for example in examples] for key in (examples[0] if examples else ("image", "depth", "name"))}


class _Chain:
    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, example):
        return self.second(self.first(example))


