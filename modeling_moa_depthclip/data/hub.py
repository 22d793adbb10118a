"""Hub datasets that `datasets.load_dataset` cannot read as depth data: loading scripts and tar shards of `.h5` frames.

`datasets` 4 and later no longer run loading scripts ("Dataset scripts are no longer supported"). The NYU Depth V2
repository the recipe trains on (`sayakpaul/nyu_depth_v2`) is such a script over fast-depth `.h5` frames in tar
shards (`data/train-0000NN.tar`: 47,584 training frames; `data/val-00000N.tar`: the 654 Eigen test frames, the
`validation` split). For such a repository the shards of the split asked for are downloaded with `huggingface_hub`
(into its cache: resumable, downloaded once) and read in place, or streamed over HTTP with `streaming=True`.
"""

from __future__ import annotations

import logging
from typing import Any

import huggingface_hub
from tqdm.auto import tqdm

from .layouts import normalise_split, split_error
from .nyu import split_of_shard, tar_shards_dataset

__all__ = ["is_loading_script_error", "load_hub_tar_shards"]

logger = logging.getLogger(__name__)

_SCRIPT_ERRORS = ("dataset scripts are no longer supported", "trust_remote_code", "loading script")


def is_loading_script_error(error: BaseException) -> bool:
    """Whether `datasets.load_dataset` failed because the repository is a loading script."""
    return any(marker in str(error).lower() for marker in _SCRIPT_ERRORS)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB"


def load_hub_tar_shards(repo_id: str, split: str, *, reason: str, streaming: bool = False, **decoder_kwargs: Any):
    """The `split` of a Hub dataset repository made of tar shards of fast-depth `.h5` frames (see the module
    docstring); `reason` says why `datasets.load_dataset` was not used, in the one log line of this path."""
    api = huggingface_hub.HfApi()
    files = api.list_repo_files(repo_id, repo_type="dataset")
    by_split: dict[str, list[str]] = {}
    for name in files:
        shard_split = split_of_shard(name)
        if shard_split:
            by_split.setdefault(shard_split, []).append(name)
    if not by_split:
        raise ValueError(f"cannot load Hub dataset {repo_id!r}: {reason}, and it has no tar shards of .h5 frames")
    wanted = normalise_split(split)
    if wanted not in by_split:
        raise split_error(split, f"Hub dataset {repo_id!r}", by_split)
    shards = sorted(by_split[wanted])
    sizes = {info.path: int(info.size or 0) for info in api.get_paths_info(repo_id, shards, repo_type="dataset")}
    total = sum(sizes.get(s, 0) for s in shards)
    if streaming:
        logger.info(
            f"{repo_id} ({split}): {reason}; streaming its {len(shards)} tar shard(s) of .h5 frames "
            f"({_gib(total)}) over HTTP with huggingface_hub, nothing downloaded ahead"
        )
        urls = [f"hf://datasets/{repo_id}/{shard}" for shard in shards]
        return tar_shards_dataset(urls, source=repo_id, streaming=True, **decoder_kwargs)
    cached = {
        s for s in shards
        if isinstance(huggingface_hub.try_to_load_from_cache(repo_id, s, repo_type="dataset"), str)
    }
    to_download = sum(sizes.get(s, 0) for s in shards if s not in cached)
    logger.info(
        f"{repo_id} ({split}): {reason}; reading its {len(shards)} tar shard(s) of .h5 frames in place instead: "
        f"{_gib(total)}, of which {_gib(to_download)} to download with huggingface_hub (cached, resumable)"
    )
    local = [
        huggingface_hub.hf_hub_download(repo_id, shard, repo_type="dataset")
        for shard in tqdm(shards, desc=f"{repo_id} {split} shards", unit="shard", disable=not (set(shards) - cached))
    ]
    return tar_shards_dataset(local, source=repo_id, **decoder_kwargs)
