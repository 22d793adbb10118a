"""examples/predict_dataset.py: depth for a folder of 200 small images built from the shared NYU frames (one of them
broken), with the tiny model: 1 and 2 real processes, killed and restarted runs, both depth formats, streaming,
uncertainty, push to the Hub (mocked) and bad arguments.

Single-process runs call the script's `main` in this process; runs with 2 processes or a kill are subprocesses
(accelerate's torchrun launcher with ACCELERATE_USE_CPU, which makes each process a gloo CPU rank)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from modeling_moa_depthclip.inference.dataset_prediction import decode_depth

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "examples" / "predict_dataset.py"
KILLER = Path(__file__).resolve().parent / "predict_dataset_killer.py"
ACCELERATE = Path(sys.executable).with_name("accelerate")
NUM_IMAGES, BROKEN_ROW, SHARD_SIZE = 200, 100, 16
MILLIMETRE = 1e-3 + 1e-6  # one storage step of png16: runs may differ by fp32 rounding across it


def _load_script():
    spec = importlib.util.spec_from_file_location("predict_dataset_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


script = _load_script()


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """In-process runs on one thread: torch's threads, imported before the script could make them sleep when idle,
    spin against the other processes of a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory, nyu_sample_dir) -> Path:
    """200 small crops of the NYU frames, img_0100.png not an image."""
    folder = tmp_path_factory.mktemp("images") / "images"
    folder.mkdir()
    frames = sorted(nyu_sample_dir.glob("*_colors.png"))
    for i in range(NUM_IMAGES):
        with Image.open(frames[i % len(frames)]) as frame:
            x, y = (i * 7) % 200, (i * 5) % 150
            frame.convert("RGB").crop((x, y, x + 320, y + 240)).resize((40, 32)).save(folder / f"img_{i:04d}.png")
    (folder / f"img_{BROKEN_ROW:04d}.png").write_bytes(b"not a png")
    return folder


def _args(checkpoint, dataset, output_dir, *extra):
    return ["--model", checkpoint, "--dataset", dataset, "--output_dir", output_dir, "--shard_size", SHARD_SIZE,
            "--batch_size", 8, "--num_workers", 0, *extra]


def run_here(*args) -> int:
    return script.main([str(a) for a in args])


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               ACCELERATE_USE_CPU="true")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def run_processes(num_processes: int, *args, kill_after: int | None = None) -> subprocess.CompletedProcess:
    program = [KILLER, kill_after] if kill_after is not None else [SCRIPT]
    if num_processes == 1:
        command = [sys.executable, *program]
    else:
        command = [ACCELERATE, "launch", "--multi_gpu", "--num_processes", num_processes, "--num_machines", 1,
                   "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", 0, *program]
    return subprocess.run([str(a) for a in command + list(args)], env=_env(), capture_output=True, text=True,
                          timeout=240)


def read_depths(output_dir: Path, depth_format="png16", column="depth", tmp=None) -> dict[int, np.ndarray]:
    """row_index -> depth (metres) through `datasets.load_dataset("parquet", ...)`; a row twice fails."""
    import datasets

    loaded = datasets.load_dataset(
        "parquet", data_files=str(output_dir / "data" / "*.parquet"), split="train",
        cache_dir=str((tmp or output_dir.parent) / f"cache_{output_dir.name}"),
    )
    if depth_format == "float16":  # nested lists: as arrays, not Python lists
        loaded = loaded.with_format("numpy", columns=["row_index", column])
    depths = {}
    for row in loaded:
        index = int(row["row_index"])
        assert index not in depths, f"row {index} written twice"
        depths[index] = decode_depth(row[column], depth_format)
    return depths


def assert_same_depths(found: dict, expected: dict, tolerance=MILLIMETRE):
    assert sorted(found) == sorted(expected)
    for index, depth in expected.items():
        assert found[index].shape == depth.shape == (32, 40)
        np.testing.assert_allclose(found[index], depth, rtol=0, atol=tolerance, err_msg=f"row {index}")


def assert_complete(output_dir: Path):
    """Every row once: in the shards or in errors.jsonl (the broken image), counted in the summary."""
    summary = json.loads((output_dir / "summary.json").read_text())
    errors = [json.loads(line) for line in (output_dir / "errors.jsonl").read_text().splitlines()]
    assert [error["row_index"] for error in errors] == [BROKEN_ROW]
    assert f"img_{BROKEN_ROW:04d}.png" in errors[0]["reason"] and "not a readable image" in errors[0]["reason"]
    assert (summary["total_rows"], summary["written_rows"], summary["error_rows"]) == (NUM_IMAGES, NUM_IMAGES - 1, 1)
    assert not any((output_dir / ".incomplete").iterdir())
    return summary


@pytest.fixture(scope="module")
def reference(image_folder, checkpoint, tmp_path_factory):
    """The uninterrupted single-process run: row_index -> depth."""
    output_dir = tmp_path_factory.mktemp("reference") / "out"
    assert run_here(*_args(checkpoint, image_folder, output_dir)) == 0
    summary = assert_complete(output_dir)
    assert summary["num_processes"] == 1 and summary["num_shards"] == 13
    depths = read_depths(output_dir)
    assert len(depths) == NUM_IMAGES - 1 and BROKEN_ROW not in depths
    return depths


def test_two_processes_equal_one(image_folder, checkpoint, reference, tmp_path):
    output_dir = tmp_path / "out"
    result = run_processes(2, *_args(checkpoint, image_folder, output_dir, "--num_workers", 1))
    assert result.returncode == 0, result.stderr[-3000:]
    summary = assert_complete(output_dir)
    processes = summary["this_run"]["processes"]
    assert summary["num_processes"] == 2 and [p["process"] for p in processes] == [0, 1]
    assert all(p["shards"] > 0 for p in processes) and sum(p["rows"] for p in processes) == NUM_IMAGES
    assert "200 rows: 199 with depth, 1 unreadable" in result.stdout
    assert_same_depths(read_depths(output_dir), reference)


@pytest.mark.parametrize("first, then", [(1, 1), (2, 1)], ids=["same-number-of-processes", "two-then-one"])
def test_killed_run_restarts_to_the_same_dataset(image_folder, checkpoint, reference, tmp_path, first, then):
    output_dir = tmp_path / "out"
    args = _args(checkpoint, image_folder, output_dir)
    killed = run_processes(first, *args, kill_after=3)
    assert killed.returncode != 0
    done = sorted(p.name for p in (output_dir / "data").glob("*.parquet"))
    assert 3 <= len(done) < 13 and not (output_dir / "summary.json").exists()
    # a file left half-written by a crash never counts
    (output_dir / ".incomplete" / "shard-00012.parquet.99999").write_bytes(b"PAR1 half")

    if then == 1:
        assert run_here(*args) == 0
    else:
        restarted = run_processes(then, *args)
        assert restarted.returncode == 0, restarted.stderr[-3000:]
    summary = assert_complete(output_dir)
    assert summary["this_run"]["shards_skipped"] == len(done)
    assert summary["this_run"]["rows"] == NUM_IMAGES - sum(
        len(range(int(name[6:11]) * SHARD_SIZE, min((int(name[6:11]) + 1) * SHARD_SIZE, NUM_IMAGES))) for name in done
    )
    assert_same_depths(read_depths(output_dir), reference)


def test_float16_and_streaming_give_the_same_depths(image_folder, checkpoint, reference, tmp_path):
    """float16 metres round-trip through datasets (png16 does in every other test); a stream gives the same rows."""
    output_dir = tmp_path / "float16"
    assert run_here(*_args(checkpoint, image_folder, output_dir, "--depth_format", "float16", "--streaming")) == 0
    assert_complete(output_dir)
    import datasets

    loaded = datasets.load_dataset(str(output_dir), split="train", cache_dir=str(tmp_path / "cache"))  # the card
    assert isinstance(loaded.features["depth"], datasets.List) and isinstance(loaded.features["image"], datasets.Image)
    assert loaded[0]["image"].size == (40, 32)
    # float16 keeps 3 significant digits: within 0.1 % (the tiny model predicts a few metres)
    found = read_depths(output_dir, "float16")
    assert sorted(found) == sorted(reference)
    for index, depth in reference.items():
        np.testing.assert_allclose(found[index], depth, rtol=2e-3, atol=MILLIMETRE)


class WithUncertainty(torch.nn.Module):
    """The tiny model with a per-pixel `depth_uncertainty` (a tenth of the depth) in its output."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        output = self.model(pixel_values=pixel_values)
        return SimpleNamespace(predicted_depth=output.predicted_depth, depth_uncertainty=0.1 * output.predicted_depth)


def test_uncertainty_column_when_the_model_has_one(image_folder, checkpoint, reference, tmp_path, monkeypatch):
    load = script.load_inference_model

    def load_with_uncertainty(*args):
        model, image_processor = load(*args)
        return WithUncertainty(model), image_processor

    monkeypatch.setattr(script, "load_inference_model", load_with_uncertainty)
    output_dir = tmp_path / "out"
    assert run_here(*_args(checkpoint, image_folder, output_dir)) == 0
    depths, uncertainty = read_depths(output_dir), read_depths(output_dir, column="uncertainty")
    assert_same_depths(depths, reference)
    for index, depth in depths.items():
        np.testing.assert_allclose(uncertainty[index], 0.1 * reference[index], atol=MILLIMETRE)


class RecordingHfApi:
    calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs["repo_id"], kwargs))


def test_push_to_hub_uploads_the_finished_dataset(image_folder, checkpoint, reference, tmp_path, monkeypatch, capsys):
    import huggingface_hub

    RecordingHfApi.calls = []
    monkeypatch.setattr(huggingface_hub, "HfApi", RecordingHfApi)
    output_dir = tmp_path / "out"
    assert run_here(*_args(checkpoint, image_folder, output_dir, "--push_to_hub", "me/depth")) == 0
    (_, repo, create), (_, repo2, upload) = RecordingHfApi.calls
    assert repo == repo2 == "me/depth" and create["repo_type"] == upload["repo_type"] == "dataset"
    assert upload["folder_path"] == str(output_dir) and "data/*.parquet" in upload["allow_patterns"]
    assert "pushed to https://huggingface.co/datasets/me/depth" in capsys.readouterr().out


def test_a_folder_of_another_run_is_refused(image_folder, checkpoint, reference, tmp_path, capsys):
    output_dir = tmp_path / "out"
    assert run_here(*_args(checkpoint, image_folder, output_dir)) == 0
    before = sorted(p.name for p in (output_dir / "data").iterdir())
    # the same command on a finished folder has nothing left to do
    assert run_here(*_args(checkpoint, image_folder, output_dir)) == 0
    summary = json.loads((output_dir / "summary.json").read_text())
    assert (summary["this_run"]["rows"], summary["this_run"]["shards_skipped"], summary["written_rows"]) == (0, 13, 199)
    capsys.readouterr()
    assert run_here(*_args(checkpoint, image_folder, output_dir, "--depth_format", "float16")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "other settings" in error and "depth_format 'png16' -> 'float16'" in error
    assert sorted(p.name for p in (output_dir / "data").iterdir()) == before
    # asked to: the run's results are replaced, another file in the folder is kept
    (output_dir / "notes.txt").write_text("mine")
    assert run_here(*_args(checkpoint, image_folder, output_dir, "--depth_format", "float16", "--overwrite")) == 0
    assert (output_dir / "notes.txt").read_text() == "mine"
    assert json.loads((output_dir / "summary.json").read_text())["this_run"]["shards_skipped"] == 0
    # a folder with other files and no run is not written into
    other = tmp_path / "other"
    other.mkdir()
    (other / "keep.txt").write_text("x")
    assert run_here(*_args(checkpoint, image_folder, other)) == 2
    assert "not empty" in capsys.readouterr().err and sorted(p.name for p in other.iterdir()) == ["keep.txt"]


@pytest.mark.parametrize(
    "change, message",
    [
        (["--batch_size", "0"], "--batch_size must be a positive integer, got 0"),
        (["--shard_size", "-3"], "--shard_size must be a positive integer"),
        (["--depth_format", "jpeg"], "invalid choice: 'jpeg'"),
        (["--dtype", "int4"], "invalid choice: 'int4'"),
        (["--num_workers", "-1"], "--num_workers must be >= 0"),
        (["--push_to_hub", "a/b/c"], "is not a Hub repository id"),
        (["--image_column", "picture"], "image column 'picture' not in dataset"),
        (["--dataset", "/no/such/folder"], "dataset folder or file not found: /no/such/folder"),
        (["--model", "/no/such/model"], "model folder /no/such/model does not exist"),
        (["--depth_column", "image"], "already has a column 'image'"),
    ],
)
def test_bad_arguments_are_one_line_and_create_nothing(image_folder, checkpoint, tmp_path, capsys, change, message):
    output_dir = tmp_path / "out"
    args = [str(a) for a in _args(checkpoint, image_folder, output_dir)]
    for position in range(0, len(change), 2):  # replace the flag's value, or add the flag
        if change[position] in args:
            args[args.index(change[position]) + 1] = change[position + 1]
        else:
            args += change[position:position + 2]
    try:
        status = run_here(*args)
    except SystemExit as exit:
        status = exit.code
    error = capsys.readouterr().err.strip()
    assert status == 2 and len(error.splitlines()) == 1 and message in error, error
    assert error.startswith("predict_dataset.py: error: ")
    assert not output_dir.exists()


def test_a_saved_dataset_keeps_its_columns(image_folder, checkpoint, reference, tmp_path, capsys):
    """A save_to_disk folder: its image column (named otherwise) is found, every column is kept as stored, and a
    second image column makes the choice ambiguous (one line) until --image_column names one."""
    import datasets

    files = [str(image_folder / f"img_{i:04d}.png") for i in range(20)]
    Image.new("RGB", (4, 4)).save(tmp_path / "tiny.png")  # readable, but too small for the image processor
    files[5] = str(tmp_path / "tiny.png")
    table = datasets.Dataset.from_dict(
        {"photo": files, "caption": [f"frame {i}" for i in range(20)], "scene": list(range(20))},
        features=datasets.Features(
            {"photo": datasets.Image(), "caption": datasets.Value("string"), "scene": datasets.Value("int32")}
        ),
    )
    table.save_to_disk(str(tmp_path / "saved"))
    output_dir = tmp_path / "out"
    assert run_here(*_args(checkpoint, tmp_path / "saved", output_dir)) == 0
    loaded = datasets.load_dataset("parquet", data_dir=str(output_dir / "data"), split="train",
                                   cache_dir=str(tmp_path / "cache"))
    # the tiny model has depth bins: its uncertainty comes as a column too
    assert loaded.column_names == ["photo", "caption", "scene", "row_index", "depth", "uncertainty"]
    assert loaded.features["scene"] == datasets.Value("int32")
    assert sorted(loaded["row_index"]) == [i for i in range(20) if i != 5]
    (error,) = [json.loads(line) for line in (output_dir / "errors.jsonl").read_text().splitlines()]
    assert error["row_index"] == 5 and "4x4 pixels" in error["reason"]
    for row in loaded:
        index = row["row_index"]
        assert row["caption"] == f"frame {index}" and row["scene"] == index
        with Image.open(files[index]) as original:
            assert np.array_equal(np.asarray(row["photo"]), np.asarray(original))
        np.testing.assert_allclose(decode_depth(row["depth"], "png16"), reference[index], atol=MILLIMETRE)

    two = table.add_column("thumbnail", files).cast_column("thumbnail", datasets.Image())
    two.save_to_disk(str(tmp_path / "two"))
    capsys.readouterr()
    assert run_here(*_args(checkpoint, tmp_path / "two", tmp_path / "out2")) == 2
    error = capsys.readouterr().err.strip()
    assert len(error.splitlines()) == 1 and "several image columns ['photo', 'thumbnail']" in error
    assert run_here(*_args(checkpoint, tmp_path / "two", tmp_path / "out2", "--image_column", "thumbnail")) == 0


def test_a_depth_dataset_keeps_its_ground_truth(nyu_sample_dir, checkpoint, tmp_path, capsys):
    """The shared NYU frames, read by load_depth_dataset: the ground truth is the input's `depth`, so the prediction
    needs another name; both are written in the chosen format."""
    args = ["--model", checkpoint, "--dataset", nyu_sample_dir, "--split", "test", "--shard_size", 10,
            "--num_workers", 0, "--depth_format", "float16"]
    assert run_here(*args, "--output_dir", tmp_path / "refused") == 2
    assert "already has a column 'depth'" in capsys.readouterr().err
    output_dir = tmp_path / "out"
    assert run_here(*args, "--output_dir", output_dir, "--depth_column", "predicted_depth") == 0
    gt = read_depths(output_dir, "float16", column="depth")
    predicted = read_depths(output_dir, "float16", column="predicted_depth")
    assert len(gt) == len(predicted) == 25
    for index in gt:
        assert gt[index].shape == predicted[index].shape == (480, 640)
        assert 0.5 < np.median(gt[index][gt[index] > 0]) < 10  # NYU indoor depth in metres


def test_bfloat16_is_close_to_float32(image_folder, checkpoint, reference, tmp_path):
    output_dir = tmp_path / "out"
    assert run_here(*_args(checkpoint, image_folder, output_dir, "--dtype", "bfloat16")) == 0
    assert json.loads((output_dir / "prediction_settings.json").read_text())["dtype"] == "bfloat16"
    found = read_depths(output_dir)
    assert sorted(found) == sorted(reference)
    for index, depth in reference.items():
        np.testing.assert_allclose(found[index], depth, rtol=0.05, atol=0.01)


def test_a_hub_dataset_is_read_with_datasets(image_folder, checkpoint, reference, tmp_path, monkeypatch):
    """A Hub id goes to `datasets.load_dataset` with its configuration, split and streaming flag (offline here: the
    call is answered by the image folder)."""
    import datasets

    load, calls = datasets.load_dataset, []

    def hub_load(path, name=None, **kwargs):
        calls.append((path, name, kwargs))
        return load("imagefolder", data_dir=str(image_folder), **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", hub_load)
    output_dir = tmp_path / "out"
    args = _args(checkpoint, "me/photos", output_dir, "--dataset_config", "small", "--split", "train", "--streaming")
    assert run_here(*args) == 0
    assert calls == [("me/photos", "small", {"split": "train", "streaming": True})]
    monkeypatch.setattr(datasets, "load_dataset", load)
    assert_complete(output_dir)
    assert json.loads((output_dir / "prediction_settings.json").read_text())["dataset"] == "me/photos"
    assert_same_depths(read_depths(output_dir), reference)
