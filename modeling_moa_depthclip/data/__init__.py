"""Data layer for metric depth: file reading, synthetic scenes, dataset sources and augmentation.

Every source yields examples `{"image": PIL.Image (RGB), "depth": float32 [H, W] metres, "name": str}` where 0.0
marks an invalid depth pixel, as `datasets.Dataset` / `datasets.IterableDataset` objects:

* `reading`: image and depth files, the one depth-unit rule (`depth_unit` / `depth_scale` override it);
* `synthetic`: procedurally generated, ray-cast indoor rooms;
* `layouts`: DenseDepth CSVs and BTS filenames files, and how a folder names its splits;
* `sources`: `classify_source` and `load_depth_dataset` (folders, list files, `save_to_disk` folders, Hub ids);
* `nyu`, `hub`: NYU Depth V2 as published (fast-depth `.h5` trees and tar shards, DenseDepth's Eigen test arrays,
  Hub repositories that are loading scripts over tar shards), read in place;
* `augmentation`: paired RGB-D augmentation, the training view and the batch collator.

The depth range is never decided here: functions take `min_depth` / `max_depth` (None: no clipping) and callers
pass the model's `config.min_depth` / `config.max_depth`.
"""

from .augmentation import DepthAugmentation, DepthCollator, TrainingExamples, default_num_workers
from .decoded_cache import DecodedFrames
from .layouts import STANDARD_SPLITS
from .nyu import NpyFrames, index_tar_shard, read_fastdepth_h5
from .reading import (
    DEPTH_UNITS,
    DepthUnitWarning,
    depth_to_metres,
    make_example,
    read_depth_image,
    read_rgb_image,
    sanitize_depth,
)
from .sources import (
    DepthExampleDecoder,
    SourceKind,
    classify_source,
    depth_dataset_from_files,
    load_depth_dataset,
    with_example_transform,
)
from .synthetic import NYU_FOCAL, NYU_HFOV_DEG, camera_rays, render_plane_depth, render_room, render_synthetic_scene

__all__ = [
    "DEPTH_UNITS",
    "NYU_FOCAL",
    "NYU_HFOV_DEG",
    "STANDARD_SPLITS",
    "DecodedFrames",
    "DepthAugmentation",
    "DepthCollator",
    "DepthExampleDecoder",
    "DepthUnitWarning",
    "NpyFrames",
    "SourceKind",
    "TrainingExamples",
    "camera_rays",
    "classify_source",
    "depth_dataset_from_files",
    "depth_to_metres",
    "index_tar_shard",
    "load_depth_dataset",
    "make_example",
    "read_depth_image",
    "read_fastdepth_h5",
    "read_rgb_image",
    "render_plane_depth",
    "render_room",
    "render_synthetic_scene",
    "sanitize_depth",
    "default_num_workers",
    "with_example_transform",
]
