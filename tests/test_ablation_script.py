"""examples/ablation.py end to end on the tiny configuration and synthetic rooms: one trained variant and the
zero-shot baseline, trained by examples/train.py and scored by examples/evaluate.py on the same frames."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_moa_depthclip.evaluation.metrics import METRIC_KEYS

REPO_ROOT = Path(__file__).resolve().parents[1]


def load_script():
    """examples/ablation.py as a module (registered, as its settings dataclass needs)."""
    name = "moa_ablation_script"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "examples" / "ablation.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


ARGS = ["--config_name", "tiny", "--variants", "no_adapters", "zero_shot", "--max_train_steps", "2",
        "--per_device_train_batch_size", "2", "--synthetic_size", "64", "96", "--max_eval_samples", "2",
        "--train_args", "--max_train_samples 4 --no_augmentation"]  # fmt: skip


def test_ablation_trains_and_scores_each_variant_alike(tmp_path, capsys):
    script = load_script()
    output = tmp_path / "ablation"
    rows = script.main([*ARGS, "--output_dir", str(output)])

    saved = json.loads((output / "ablation.json").read_text())
    assert saved["rows"] == rows and [row["name"] for row in rows] == ["no_adapters", "zero_shot"]
    assert saved["setup"]["max_train_steps"] == 2 and saved["setup"]["eval_split"] == "test"
    trained, zero_shot = rows
    for row in rows:
        assert all(math.isfinite(row[key]) for key in METRIC_KEYS) and row["num_images"] == 2
    assert zero_shot["trainable_parameters"] == 0 and zero_shot["train_seconds"] == 0
    assert trained["train_seconds"] > 0
    # the row counts what the variant's folder trains
    variants = output / "variants"
    initial = load_file(variants / "no_adapters" / "initial" / "model.safetensors")
    final = load_file(variants / "no_adapters" / "train" / "final" / "model.safetensors")
    assert not any(key.startswith("moa.") for key in initial)
    moved = {key for key in initial if not torch.equal(initial[key], final[key])}
    assert moved and all(not key.startswith("vision_model.") or ".layers.3." in key for key in moved)
    # both were scored on the same frames with the same protocol
    protocols = [json.loads((variants / n / "evaluation" / "metrics.json").read_text())["protocol"] for n in
                 ("no_adapters", "zero_shot")]  # fmt: skip
    for protocol in protocols:
        protocol.pop("model", None)
    assert protocols[0] == protocols[1]
    table = (output / "ablation.md").read_text()
    assert "| zero_shot | 0 | 0 |" in table and "DepthCLIP zero-shot" in table
    with Image.open(output / "ablation.png") as chart:
        assert chart.size[0] > 400

    # nothing is replaced without being asked; --resume keeps what is finished
    with pytest.raises(SystemExit):
        script.main([*ARGS, "--output_dir", str(output)])
    assert "pass --overwrite" in capsys.readouterr().err.strip().splitlines()[-1]
    # bad values end in one line naming the flag, before the output folder is touched
    for argv, expected in ((["--model", str(output), "--config_name", "tiny"], "--config_name: not allowed with --model"),
                           (["--overwrite", "--resume"], "--resume: not allowed with --overwrite"),
                           (["--synthetic_size", "64"], "--synthetic_size: expected 2 values")):
        with pytest.raises(SystemExit) as exit_info:
            script.main([*ARGS, "--output_dir", str(output), *argv])
        assert exit_info.value.code == 2 and expected in capsys.readouterr().err.strip().splitlines()[-1]
    stamp = (variants / "zero_shot" / "result.json").stat().st_mtime_ns
    assert script.main([*ARGS, "--output_dir", str(output), "--resume"]) == rows
    assert (variants / "zero_shot" / "result.json").stat().st_mtime_ns == stamp
