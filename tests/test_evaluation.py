"""modeling_moa_depthclip.evaluation: the one model loader and its errors, the output folder check, skipped frames."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from modeling_moa_depthclip.evaluation import (
    check_output_dir,
    evaluate,
    write_evaluation_outputs,
)
from modeling_moa_depthclip.loading import ModelLoadError, load_config, load_model_and_processor

from tiny_models import tiny_processor


REPO_ROOT = Path(__file__).resolve().parents[1]


def _copy(checkpoint, tmp_path, name="copy") -> Path:
    folder = tmp_path / name
    shutil.copytree(checkpoint, folder)
    return folder


def _truncated(checkpoint, tmp_path) -> Path:
    folder = _copy(checkpoint, tmp_path, "truncated")
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])  # what an interrupted copy or save leaves
    return folder


def _load_error(model) -> str:
    with pytest.raises(ModelLoadError) as error:
        load_model_and_processor(model)
    message = str(error.value)
    assert "\n" not in message
    return message


def _script_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


def test_loader_returns_the_model_in_eval_mode_with_its_processor(checkpoint):
    model, processor = load_model_and_processor(checkpoint, dtype=torch.bfloat16)
    assert not model.training and next(model.parameters()).dtype == torch.bfloat16
    assert processor.size == {"height": 64, "width": 64}
    trainable, _ = load_model_and_processor(checkpoint, trainable=True)
    assert trainable.training and trainable.head.regressor.weight.requires_grad
    assert load_config(checkpoint).max_depth == model.config.max_depth


def test_every_loading_failure_is_one_line_naming_the_file_and_the_reason(checkpoint, tmp_path):
    assert ModelLoadError.__mro__[1:3] == (OSError, ValueError)  # callers catching either still catch it

    message = _load_error(tmp_path / "nowhere")
    assert str(tmp_path / "nowhere") in message and "does not exist" in message

    truncated = _truncated(checkpoint, tmp_path)
    message = _load_error(truncated)  # on safetensors alone: a SafetensorError naming no file
    assert str(truncated / "model.safetensors") in message and "truncated" in message

    empty = _copy(checkpoint, tmp_path, "empty_weights")
    (empty / "model.safetensors").write_bytes(b"")
    assert f"{empty / 'model.safetensors'}: cannot read the weights: the file is empty" in _load_error(empty)

    no_weights = _copy(checkpoint, tmp_path, "no_weights")
    (no_weights / "model.safetensors").unlink()
    assert "has no model.safetensors" in _load_error(no_weights)

    no_config = _copy(checkpoint, tmp_path, "no_config")
    (no_config / "config.json").unlink()
    assert "no config.json" in _load_error(no_config)

    other = _copy(checkpoint, tmp_path, "dpt")
    settings = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**settings, "model_type": "dpt"}))
    assert "'dpt' model (a depth model of another type)" in _load_error(other)
    (other / "config.json").write_text(json.dumps({**settings, "model_type": "bert"}))
    assert "'bert' model (not a depth model)" in _load_error(other)
    (other / "config.json").write_text("{")
    assert str(other / "config.json") in _load_error(other) and "not valid JSON" in _load_error(other)

    a_file = tmp_path / "model.safetensors"
    a_file.write_bytes(b"x")
    assert "is a file, not a model folder" in _load_error(a_file)

    # weights of another configuration: transformers would initialise the odd tensors randomly, with a warning
    resized = _copy(checkpoint, tmp_path, "resized")
    (resized / "config.json").write_text(json.dumps({**settings, "num_depth_bins": 8}))
    message = _load_error(resized)
    assert "do not fit its config.json" in message and "head.bin_classifier" in message
    from safetensors.torch import load_file, save_file

    partial = _copy(checkpoint, tmp_path, "partial")
    tensors = load_file(partial / "model.safetensors")
    save_file({k: v for k, v in tensors.items() if not k.startswith("head.")}, partial / "model.safetensors",
              metadata={"format": "pt"})
    message = _load_error(partial)
    assert "lack" in message and "head." in message


def test_cli_and_export_report_a_truncated_model_in_one_line(checkpoint, nyu_sample_dir, tmp_path, capsys):
    from modeling_moa_depthclip.cli.predict import main as cli_main

    truncated = _truncated(checkpoint, tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["predict", str(nyu_sample_dir / "00000_colors.png"), "--model", str(truncated),
                  "--output-dir", str(tmp_path / "out")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(truncated / "model.safetensors") in err and "truncated" in err

    from conversion.export_onnx import main as export_main

    assert export_main(["--model", str(truncated), "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "truncated" in err and not (tmp_path / "m.onnx").exists()


def test_output_folder_is_checked_before_any_work(tmp_path):
    a_file = tmp_path / "results"
    a_file.write_text("the user's file")
    with pytest.raises(OSError, match="is a file"):
        check_output_dir(a_file)
    with pytest.raises(OSError, match="cannot be created"):
        check_output_dir(a_file / "eval")
    assert check_output_dir(tmp_path / "new" / "eval").is_dir()
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        with pytest.raises(OSError, match="not writable"):
            check_output_dir(locked)


def test_evaluate_script_fails_in_one_line_before_evaluating(checkpoint, nyu_sample_dir, tmp_path):
    """An --output_dir that is a file fails before the first frame (it used to fail after the last, losing every
    result); a truncated model names its file. Both exit with status 2 and leave the user's file alone."""
    a_file = tmp_path / "results"
    a_file.write_text("the user's file")
    truncated = _truncated(checkpoint, tmp_path)
    for model, output_dir, expected in (
        (checkpoint, a_file, f"--output_dir: output folder {a_file} is a file"),
        (truncated, tmp_path / "out",
         f"{truncated / 'model.safetensors'}: cannot read the weights: the file is truncated"),
    ):
        completed = subprocess.run(
            [sys.executable, str(REPO_ROOT / "examples" / "evaluate.py"), "--model", str(model), "--dataset",
             str(nyu_sample_dir), "--output_dir", str(output_dir)],
            capture_output=True, text=True, env=_script_env(), timeout=300,
        )
        assert completed.returncode == 2, completed.stderr[-2000:]
        last = completed.stderr.strip().splitlines()[-1]
        assert last.startswith("evaluate.py: error:") and expected in last, completed.stderr[-2000:]
        assert "Traceback" not in completed.stderr and "evaluate " not in completed.stderr  # no progress bar
    assert a_file.read_text() == "the user's file"


def _evaluate_script():
    """examples/evaluate.py as a module, so that its main() runs in this process."""
    name = "moa_depthclip_examples_evaluate"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / "evaluate.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def test_evaluate_script_creates_nothing_before_every_argument_is_valid(checkpoint, tmp_path, capsys):
    """Bad values end with one line naming the flag, and no output folder is left behind."""
    script = _evaluate_script()
    out = tmp_path / "out" / "eval"
    patch = json.loads((checkpoint / "config.json").read_text())["vision_config"]["patch_size"]
    for argv, expected in (
        (["--input_size", patch + 1, patch * 2], f"--input_size: {patch + 1} {patch * 2}: both sides must be multiples"),
        (["--input_size", patch], "--input_size: expected 2 values (HEIGHT WIDTH), got 1"),
        (["--batch_size", 0], "--batch_size: expected a positive integer, got 0"),
        (["--min_depth", 5, "--max_depth", 2], "--min_depth/--max_depth: need 0 < min_depth < max_depth"),
        (["--dataset", tmp_path / "no_such_folder"], "--dataset: dataset folder or file not found"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            script.main([str(a) for a in ["--model", checkpoint, "--dataset", "synthetic", "--num_samples", 1,
                                          "--output_dir", out, *argv]])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("evaluate.py: error: ") and expected in err[-1], err
        assert not (tmp_path / "out").exists()


def _frames(nyu_sample_dataset, count):
    return [dict(example) for example in nyu_sample_dataset[:count]]


def test_a_frame_without_valid_pixels_is_skipped_counted_and_named(checkpoint, nyu_sample_dataset, tmp_path):
    model, processor = load_model_and_processor(checkpoint)
    frames = _frames(nyu_sample_dataset, 3)
    blank = frames[1]["name"]
    frames[1]["depth"] = np.zeros_like(frames[1]["depth"])  # e.g. a sensor dropout: no valid ground truth at all
    result = evaluate(model, processor, frames, batch_size=2, show_progress=False, dataset_name="frames")
    assert result["num_images"] == 2 and result["skipped"] == [blank]
    assert [r["name"] for r in result["per_image"]] == sorted(f["name"] for f in frames if f["name"] != blank)
    alone = evaluate(model, processor, [frames[0], frames[2]], show_progress=False)
    assert result["metrics"] == pytest.approx(alone["metrics"], rel=1e-6)  # the blank frame changed nothing else

    paths = write_evaluation_outputs(result, tmp_path / "eval", "with a blank frame")
    written = json.loads(paths["metrics_json"].read_text())
    assert written["num_images"] == 2 and written["num_skipped"] == 1 and written["skipped_frames"] == [blank]
    assert "skipped 1 frame(s) without a valid ground-truth pixel" in paths["metrics_md"].read_text()
    assert blank in paths["metrics_md"].read_text()
    assert blank not in paths["per_image_csv"].read_text()

    with pytest.raises(ValueError, match=r"no frame of blanks has a valid ground-truth pixel .* all 1 skipped"):
        evaluate(model, processor, [frames[1]], show_progress=False, dataset_name="blanks")


def test_the_depth_range_comes_from_the_model_config(checkpoint, nyu_sample_dataset):
    model, processor = load_model_and_processor(checkpoint)
    frames = _frames(nyu_sample_dataset, 2)
    result = evaluate(model, processor, frames, show_progress=False)
    assert result["protocol"]["clamp_range_m"] == [model.config.min_depth, model.config.max_depth]
    model.config.max_depth = 4.0  # ground truth beyond 4 m no longer counts
    narrow = evaluate(model, processor, frames, show_progress=False)
    assert narrow["protocol"]["clamp_range_m"] == [model.config.min_depth, 4.0]
    assert narrow["metrics"] != result["metrics"]
    explicit = evaluate(model, processor, frames, show_progress=False, max_depth=6.0)
    assert explicit["protocol"]["valid_gt"] == f"finite and in ({model.config.min_depth:g}, 6] m"

    class NoConfig(torch.nn.Module):
        def forward(self, pixel_values):
            raise AssertionError("not reached")

    with pytest.raises(ValueError, match="depth range is not known"):
        evaluate(NoConfig(), tiny_processor(), frames, show_progress=False)


def test_the_nyu_sample_folder_is_the_callers_choice_or_the_environment_variables(tmp_path, monkeypatch):
    """The package does not know where the repository's neighbours are: it takes a folder or the variable."""
    from modeling_moa_depthclip.evaluation import NYU_SAMPLE_ENV, nyu_sample_dir

    monkeypatch.delenv(NYU_SAMPLE_ENV, raising=False)
    frames, other, empty = tmp_path / "frames", tmp_path / "other", tmp_path / "empty"
    for folder in (frames, other, empty):
        folder.mkdir()
    (frames / "index.csv").write_text("a_colors.png,a_depth.png\n")
    (other / "index.csv").write_text("a_colors.png,a_depth.png\n")
    assert nyu_sample_dir() is None and nyu_sample_dir(empty) is None
    assert nyu_sample_dir(frames) == frames
    monkeypatch.setenv(NYU_SAMPLE_ENV, str(other))
    assert nyu_sample_dir(frames) == other and nyu_sample_dir() == other
