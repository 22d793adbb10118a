"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# Tests must never reach the network (hub downloads would hang or flake offline).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO_ROOT = Path(__file__).resolve().parents[1]
# the tests' one choice of where the shared NYU frames are (the package takes a folder or $MOA_DEPTHCLIP_NYU_SAMPLE)
NYU_SAMPLE_DEFAULT = REPO_ROOT.parent / "shared" / "data" / "nyu_eigen_test_sample"
NYU_SAMPLE_ENV = "MOA_DEPTHCLIP_NYU_SAMPLE"  # read by the package's evaluation.nyu_sample_dir too


def _nyu_sample_path() -> Path:
    """Where the tests look for the NYU frames: $MOA_DEPTHCLIP_NYU_SAMPLE, else NYU_SAMPLE_DEFAULT."""
    return Path(os.environ.get(NYU_SAMPLE_ENV) or NYU_SAMPLE_DEFAULT).expanduser()


@pytest.fixture(scope="session")
def nyu_sample_dir() -> Path:
    """Folder with the 25 real NYU Depth V2 test frames (DenseDepth layout); skips if absent."""
    path = _nyu_sample_path()
    if not (path / "index.csv").is_file():
        pytest.skip(f"NYU sample frames not found at {path} (set {NYU_SAMPLE_ENV} to the folder with index.csv)")
    return path


@pytest.fixture(scope="session")
def nyu_sample_dataset(nyu_sample_dir):
    """The shared NYU frames loaded once per session as a list of example dicts."""
    from modeling_moa_depthclip.data import load_depth_dataset

    dataset = load_depth_dataset(nyu_sample_dir, split="test")
    return [dataset[i] for i in range(len(dataset))]


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A tiny saved MoA-DepthCLIP folder (model + image processor), shared: tests copy it before changing it.
    Modules that need another checkpoint define their own `checkpoint`."""
    from tiny_models import save_tiny_checkpoint

    folder = tmp_path_factory.mktemp("tiny_checkpoint") / "model"
    save_tiny_checkpoint(folder)
    return folder
