"""examples/train.py, examples/evaluate.py and modeling_moa_depthclip.evaluation: the NYU protocol, learning, exact
resumption, multi-process runs, errors.

Training runs use the tiny configuration (examples/configs/tiny.json = tests/tiny_models.py) on one CPU thread:
with two threads on a 2-core machine, a concurrently busy core slows the tiny model's small kernels ~50x.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from modeling_moa_depthclip import evaluation
from modeling_moa_depthclip.training.run_folder import list_checkpoints
from modeling_moa_depthclip.loading import load_model_and_processor
from modeling_moa_depthclip.evaluation.metrics import METRIC_KEYS, compute_depth_metrics, eigen_crop_mask

from tiny_models import tiny_config, tiny_processor


REPO_ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = REPO_ROOT / "examples"
ACCELERATE = Path(sys.executable).with_name("accelerate")


def _load_train_script():
    """examples/train.py as a module, so that its main() runs in this process (a subprocess per run costs seconds
    of imports); the evaluation both scripts share is the package's, tested directly."""
    name = "moa_depthclip_examples_train"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, EXAMPLES / "train.py")
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


train_script = _load_train_script()


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def run_train():
    """Run train.py's main in this process, with accelerate's process-wide state reset around each run."""
    from accelerate.state import AcceleratorState, GradientState

    def reset():
        AcceleratorState._reset_state(True)
        GradientState._reset_state()

    def run(*argv):
        reset()
        try:
            return train_script.main([str(a) for a in argv])
        finally:
            reset()

    yield run
    reset()


def _subprocess_env():
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               ACCELERATE_USE_CPU="true")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    return env


# ------------------------------------------------------------------------------------------------
# The evaluation protocol, through evaluate()'s model code path
# ------------------------------------------------------------------------------------------------


def _key(pixel_values: torch.Tensor) -> str:
    return hashlib.sha1(pixel_values.contiguous().numpy().tobytes()).hexdigest()


class OracleDepthModel(torch.nn.Module):
    """Returns each frame's own ground truth (times `scale`) at 480x640, recognised by its exact pixel values.

    Flipped inputs get the flipped depth, so flip averaging is exercised too. `outside_crop_scale` multiplies the
    depth outside the Eigen crop instead, to show which pixels the metrics read.
    """

    def __init__(self, image_processor, examples, scale=1.0, outside_crop_scale=None):
        super().__init__()
        self.config = tiny_config()  # the depth range of the NYU models: [1e-3, 10] m
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # gives evaluate() a device and dtype
        self.table = {}
        for example in examples:
            pixels = image_processor([example["image"]], return_tensors="pt")["pixel_values"][0]
            depth = torch.from_numpy(example["depth"]) * scale
            if outside_crop_scale is not None:
                inside = torch.from_numpy(eigen_crop_mask(*depth.shape))
                depth = torch.where(inside, depth, depth * outside_crop_scale)
            self.table[_key(pixels)] = depth
            self.table[_key(torch.flip(pixels, dims=[-1]))] = torch.flip(depth, dims=[-1])
        self.calls = 0

    def forward(self, pixel_values):
        self.calls += 1
        return SimpleNamespace(predicted_depth=torch.stack([self.table[_key(p)] for p in pixel_values]))


def test_oracle_model_scores_perfectly_and_scaled_ground_truth_gives_known_metrics(nyu_sample_dataset, tmp_path):
    """Ground truth as the prediction: d1 = 1, abs_rel = rmse = 0 on the 25 shared NYU frames (with and without flip
    averaging); ground truth x 1.3: d1 = 0, d2 = d3 = 1, abs_rel = 0.3 when nothing is clamped (clamp range up to
    13 m), and under the standard [1e-3, 10] m clamp exactly the independently computed values of the clamped
    prediction (9 of the 25 frames have pixels beyond 10 / 1.3 m, so clamping changes the numbers)."""
    frames = nyu_sample_dataset
    processor = tiny_processor()  # 64x64 input: only the pixels' identity matters to the oracle
    oracle = OracleDepthModel(processor, frames)

    for flip in (False, True):
        result = evaluation.evaluate(oracle, processor, frames, batch_size=4, flip_average=flip,
                                          show_progress=False)
        assert result["num_images"] == 25
        m = result["metrics"]
        assert m["d1"] == 1.0 and m["d2"] == 1.0 and m["d3"] == 1.0
        for key in ("abs_rel", "sq_rel", "rmse", "rmse_log", "log10", "silog"):
            assert m[key] == pytest.approx(0.0, abs=1e-6), key
        assert result["protocol"]["flip_average"] is flip
    assert oracle.calls == 7 + 14  # ceil(25 / 4) batches, twice as many forward passes with flip averaging

    scaled = OracleDepthModel(processor, frames, scale=1.3)
    unclamped = evaluation.evaluate(scaled, processor, frames, max_depth=13.0, show_progress=False)["metrics"]
    assert unclamped["d1"] == 0.0 and unclamped["d2"] == 1.0 and unclamped["d3"] == 1.0
    assert unclamped["abs_rel"] == pytest.approx(0.3, abs=1e-6)
    assert unclamped["rmse_log"] == pytest.approx(np.log(1.3), abs=1e-6)
    assert unclamped["log10"] == pytest.approx(np.log10(1.3), abs=1e-6)
    assert unclamped["silog"] == pytest.approx(0.0, abs=1e-3)

    standard = evaluation.evaluate(scaled, processor, frames, show_progress=False)
    expected = {key: [] for key in ("d1", "abs_rel", "rmse")}
    for example in frames:
        gt = example["depth"].astype(np.float64)
        valid = eigen_crop_mask(*gt.shape) & (gt > 1e-3) & (gt <= 10.0)
        g = gt[valid]
        p = np.clip(1.3 * g, 1e-3, 10.0)
        expected["d1"].append(np.mean(np.maximum(p / g, g / p) < 1.25))
        expected["abs_rel"].append(np.mean(np.abs(p - g) / g))
        expected["rmse"].append(np.sqrt(np.mean((p - g) ** 2)))
    for key, values in expected.items():
        assert standard["metrics"][key] == pytest.approx(np.mean(values), rel=1e-6), key
    assert 0.0 < standard["metrics"]["d1"] < 0.1 and standard["metrics"]["abs_rel"] < 0.3

    # the Eigen crop: a prediction wrong only outside the crop is perfect with it and not without it
    wrong_outside = OracleDepthModel(processor, frames, outside_crop_scale=2.0)
    cropped = evaluation.evaluate(wrong_outside, processor, frames, crop="eigen", show_progress=False)
    uncropped = evaluation.evaluate(wrong_outside, processor, frames, crop="none", show_progress=False)
    assert cropped["metrics"]["d1"] == 1.0 and cropped["metrics"]["rmse"] == pytest.approx(0.0, abs=1e-6)
    assert uncropped["metrics"]["d1"] < 0.9

    # what the script writes
    paths = evaluation.write_evaluation_outputs(standard, tmp_path, "oracle x 1.3")
    written = json.loads(paths["metrics_json"].read_text())
    assert set(METRIC_KEYS) | {"num_images", "num_skipped", "skipped_frames", "protocol"} == set(written)
    assert written["num_images"] == 25 and written["num_skipped"] == 0 and written["skipped_frames"] == []
    assert written["protocol"]["crop"] == "eigen" and written["protocol"]["clamp_range_m"] == [0.001, 10.0]
    assert "per-image" in written["protocol"]["averaging"]
    rows = paths["per_image_csv"].read_text().strip().splitlines()
    assert rows[0].split(",") == ["name", *METRIC_KEYS] and len(rows) == 26
    assert "| d1 ↑ |" in paths["metrics_md"].read_text()
    assert paths["samples_png"].stat().st_size > 10_000


# ------------------------------------------------------------------------------------------------
# Training
# ------------------------------------------------------------------------------------------------


def test_training_cuts_the_loss_and_logs_everything(run_train, nyu_sample_dir, tmp_path):
    """The tiny model trained 40 steps (batch 4, seed 0, lr 1e-3, no augmentation) on 8 shared NYU frames: the mean
    loss of the last 5 steps is below 0.75x that of the first 5 (measured: 0.54x, 7.82 -> 4.25).
    The run also writes TensorBoard scalars (loss and its parts, both learning rates, router usage per MoA layer and
    expert), the loss curve, and the final model with its image processor."""
    out = tmp_path / "run"
    summary = run_train(
        "--config_name", "tiny", "--dataset", nyu_sample_dir, "--max_train_samples", 8, "--no_augmentation",
        "--per_device_train_batch_size", 4, "--max_train_steps", 40, "--learning_rate", 1e-3,
        "--backbone_learning_rate", 1e-4, "--seed", 0, "--eval_split", "none", "--test_datasets", "none",
        "--checkpointing_steps", 0, "--output_dir", out,
    )
    losses = [loss for _, loss in summary["loss_history"]]
    assert len(losses) == 40 and summary["global_step"] == 40
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.75 * first, (first, last)

    assert (out / "loss_curve.png").stat().st_size > 10_000
    final = out / "final"
    assert (final / "model.safetensors").is_file() and (final / "preprocessor_config.json").is_file()
    assert json.loads((final / "preprocessor_config.json").read_text())["size"] == {"height": 64, "width": 64}

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    event_files = list((out / "logs").rglob("events.out.tfevents.*"))
    assert event_files
    tags = set()
    for path in event_files:
        accumulator = EventAccumulator(str(path))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    expected = {"train/loss", "train/loss_silog", "train/loss_bin_ce", "train/loss_ssim", "lr/head", "lr/backbone"}
    expected |= {f"router/layer{layer}/expert{e}" for layer in (1, 3) for e in range(4)}
    assert expected <= tags, expected - tags


def test_interrupted_and_resumed_run_ends_with_the_same_weights(run_train, tmp_path):
    """10 steps straight == 5 steps, stop (checkpoint), resume to 10: identical weights (torch.equal) and losses.

    Synthetic data with augmentation, 12 scenes in batches of 4 and 2 accumulation steps (2 optimizer steps per
    epoch, the second over a single batch), so the resume point lies mid-epoch and the first batches must be skipped.
    """
    common = (
        "--config_name", "tiny", "--max_train_samples", 12, "--synthetic_size", 96, 128,
        "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 2, "--max_train_steps", 10,
        "--learning_rate", 1e-3, "--seed", 3, "--eval_split", "none", "--test_datasets", "none",
        "--checkpointing_steps", 2, "--checkpoints_total_limit", 2,
    )
    straight = run_train(*common, "--output_dir", tmp_path / "straight")
    first = run_train(*common, "--stop_after_steps", 5, "--output_dir", tmp_path / "resumed")
    assert first["global_step"] == 5 and not (tmp_path / "resumed" / "final").exists()
    assert [p.name for _, p in list_checkpoints(tmp_path / "resumed")] == ["step_4", "step_5"]
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_5"
    assert json.loads((checkpoint / "training_progress.json").read_text())["global_step"] == 5
    assert not list(checkpoint.glob("custom_checkpoint_*"))  # nothing that would be unpickled without weights_only
    resumed = run_train(*common, "--resume_from_checkpoint", "latest", "--output_dir", tmp_path / "resumed")
    assert resumed["global_step"] == 10
    assert [p.name for _, p in list_checkpoints(tmp_path / "straight")] == ["step_8", "step_10"]

    assert resumed["loss_history"] == straight["loss_history"]
    a = load_file(tmp_path / "straight" / "final" / "model.safetensors")
    b = load_file(tmp_path / "resumed" / "final" / "model.safetensors")
    assert a.keys() == b.keys()
    changed = [k for k in a if not torch.equal(a[k], b[k])]
    assert not changed, changed
    # the weights did train, so the equality is not trivial
    assert straight["loss_history"][0][1] != straight["loss_history"][-1][1]


def test_decoded_frames_cache_trains_on_the_same_examples(run_train, nyu_sample_dir, tmp_path, capsys):
    """--decoded_cache_dir decodes each frame once into the folder and gives the same run (losses) as decoding at
    every read; a folder that cannot be written is one error naming it, before the run starts."""
    common = (
        "--config_name", "tiny", "--dataset", nyu_sample_dir, "--max_train_samples", 4,
        "--per_device_train_batch_size", 2, "--max_train_steps", 4, "--seed", 1, "--eval_split", "none",
        "--test_datasets", "none", "--checkpointing_steps", 0,
    )
    plain = run_train(*common, "--output_dir", tmp_path / "plain")
    cache = tmp_path / "decoded"
    cached = run_train(*common, "--decoded_cache_dir", cache, "--output_dir", tmp_path / "cached")
    assert cached["loss_history"] == plain["loss_history"]
    assert len(list(cache.glob("*/depth.npy"))) == 4
    (tmp_path / "a_file").write_text("")
    error = _error_of(train_script.main, [*common, "--decoded_cache_dir", tmp_path / "a_file" / "cache",
                                          "--output_dir", tmp_path / "refused"], capsys)
    assert "--decoded_cache_dir" in error and str(tmp_path / "a_file" / "cache") in error
    assert not (tmp_path / "refused").exists()  # refused before anything was written


def test_training_from_a_checkpoint_changes_only_the_trainable_weights(run_train, tmp_path):
    """--model FOLDER (a save_pretrained checkpoint) is the starting point: after training, every trainable tensor
    (MoA, context, decoder, head, last CLIP block) moved and every frozen CLIP tensor is bit-identical."""
    from tiny_models import save_tiny_checkpoint

    start = save_tiny_checkpoint(tmp_path / "start")
    run_train(
        "--model", tmp_path / "start", "--max_train_samples", 4, "--synthetic_size", 64, 96,
        "--per_device_train_batch_size", 2, "--max_train_steps", 3, "--learning_rate", 1e-3,
        "--backbone_learning_rate", 1e-3, "--eval_split", "none", "--test_datasets", "none",
        "--checkpointing_steps", 0, "--output_dir", tmp_path / "run",
    )
    before = {k: v for k, v in start.state_dict().items()}
    after = load_file(tmp_path / "run" / "final" / "model.safetensors")
    trainable = {n for n, p in start.named_parameters() if start.is_trainable_parameter(n)}
    frozen = [n for n, _ in start.named_parameters() if n not in trainable]
    assert frozen and all(torch.equal(before[n], after[n]) for n in frozen)
    moved = [n for n in trainable if not torch.equal(before[n], after[n])]
    assert "vision_model.encoder.layers.3.mlp.fc1.weight" in moved and "head.regressor.weight" in moved
    assert len(moved) >= 0.9 * len(trainable), sorted(trainable - set(moved))


def test_parameter_groups_follow_the_paper_recipe():
    from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation
    from modeling_moa_depthclip.training.optimization import parameter_groups

    model = MoADepthCLIPForDepthEstimation(tiny_config())
    groups = parameter_groups(model, 1e-4, 1e-5, 0.01)
    names = {id(p): n for n, p in model.named_parameters()}
    by_name = {g["name"]: [names[id(p)] for p in g["params"]] for g in groups}
    assert {g["name"]: (g["lr"], g["weight_decay"]) for g in groups} == {
        "head": (1e-4, 0.01), "head_no_decay": (1e-4, 0.0), "backbone": (1e-5, 0.01), "backbone_no_decay": (1e-5, 0.0)
    }
    grouped = [n for members in by_name.values() for n in members]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(grouped) == sorted(trainable) and len(grouped) == len(set(grouped))
    assert all(n.startswith("vision_model.encoder.layers.3.") for n in by_name["backbone"] + by_name["backbone_no_decay"])
    assert not any(n.startswith("vision_model.") for n in by_name["head"] + by_name["head_no_decay"])
    assert all(n.endswith("bias") or "norm" in n or model.get_parameter(n).ndim < 2
               for n in by_name["head_no_decay"] + by_name["backbone_no_decay"])
    assert "moa.1.experts.up_bias" in by_name["head_no_decay"]
    assert "decoder.detail_stem.conv1.weight" in by_name["head"]


def test_mixed_precision_accumulation_and_gradient_checkpointing_run(run_train, tmp_path):
    summary = run_train(
        "--config_name", "tiny", "--max_train_samples", 4, "--synthetic_size", 64, 96, "--per_device_train_batch_size", 2,
        "--gradient_accumulation_steps", 2, "--max_train_steps", 2, "--mixed_precision", "bf16",
        "--gradient_checkpointing", "--eval_split", "none", "--test_datasets", "none", "--checkpointing_steps", 0,
        "--labels_at_native_resolution", "--output_dir", tmp_path / "bf16",
    )
    assert summary["global_step"] == 2 and all(np.isfinite(loss) for _, loss in summary["loss_history"])


def test_local_pretrained_clip_initialises_the_backbone_else_a_warning(tmp_path, caplog, capsys):
    import torch.nn.functional as F
    from transformers import CLIPModel

    from modeling_moa_depthclip import DEPTHCLIP_PROMPTS
    from test_conversion import PROMPT_TEXTS, make_clip_tokenizer, tiny_clip_config

    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    clip_config = tiny_clip_config(
        tokenizer, {**tiny_config().vision_config.to_dict(), "hidden_act": "quick_gelu"}, projection_dim=32,
        text_layers=1,
    )
    torch.manual_seed(1)
    clip = CLIPModel(clip_config).eval()
    clip.save_pretrained(tmp_path / "clip")
    tokenizer.save_pretrained(tmp_path / "clip")
    args = train_script.TrainArguments(config_name="tiny", clip_model=str(tmp_path / "clip"))
    model, processor, description = train_script.load_or_build_model(args, train_script.model_config(args))
    assert "pretrained CLIP" in description
    assert torch.equal(
        model.vision_model.encoder.layers[0].mlp.fc1.weight, clip.vision_model.encoder.layers[0].mlp.fc1.weight
    )
    assert torch.equal(model.semantic_context.image_projection.weight, clip.visual_projection.weight)
    with torch.no_grad():
        text = clip.get_text_features(**tokenizer(DEPTHCLIP_PROMPTS, padding=True, return_tensors="pt"))
    torch.testing.assert_close(
        model.semantic_context.prompt_embeddings, F.normalize(text.pooler_output, dim=-1), rtol=0, atol=1e-6
    )
    assert [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("vision_model.")]

    # a CLIP that does not fit the config is refused, naming the field
    other = json.loads((REPO_ROOT / "examples" / "configs" / "tiny.json").read_text())
    other["vision_config"]["patch_size"] = 32
    (tmp_path / "other.json").write_text(json.dumps(other))
    args = train_script.parse_args(["--config_name", str(tmp_path / "other.json"), "--clip_model", str(tmp_path / "clip")])
    with pytest.raises(train_script.ArgumentValueError, match="patch_size: model 32 vs CLIP 16") as refused:
        train_script.load_or_build_model(args, train_script.model_config(args))
    assert refused.value.flag == "--clip_model"

    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="moa_depthclip.train"):
        args = train_script.TrainArguments(config_name="tiny", clip_model="nobody/no-such-clip")
        _, _, description = train_script.load_or_build_model(args, train_script.model_config(args))
    assert "random CLIP backbone" in description
    assert any("RANDOMLY INITIALISED" in record.getMessage() for record in caplog.records)


def test_training_on_a_saved_datasets_dataset_with_periodic_eval_and_best_model(run_train, tmp_path):
    """A `datasets` DatasetDict (save_to_disk) trains and evaluates: periodic evaluation on its test split picks
    best/, whose eval metric is the lowest of the run, and the final evaluation scores every test frame once.
    A test frame without any valid depth pixel is skipped and named, in the periodic and the final evaluation (it
    used to stop the training at its first evaluation, losing every step trained)."""
    import datasets
    from PIL import Image

    from modeling_moa_depthclip.data import render_synthetic_scene

    def split(first, count, blank=None):
        rows = [render_synthetic_scene(first + i, 48, 64) for i in range(count)]
        features = datasets.Features({"image": datasets.Image(), "depth": datasets.Array2D((48, 64), "float32"),
                                      "name": datasets.Value("string")})
        return datasets.Dataset.from_dict(
            {"image": [Image.fromarray(rgb) for rgb, _ in rows],
             "depth": [np.zeros_like(d) if first + i == blank else d for i, (_, d) in enumerate(rows)],
             "name": [f"scene_{first + i}" for i in range(count)]}, features=features)

    datasets.DatasetDict({"train": split(0, 6), "test": split(100, 4, blank=102)}).save_to_disk(tmp_path / "saved")
    out = tmp_path / "run"
    summary = run_train(
        "--config_name", "tiny", "--dataset", tmp_path / "saved", "--per_device_train_batch_size", 3,
        "--max_train_steps", 6, "--eval_steps", 2, "--learning_rate", 1e-3, "--checkpointing_steps", 0,
        "--test_datasets", f"{tmp_path / 'saved'}:test", "--output_dir", out,
    )
    history = summary["eval_history"]
    assert [e["step"] for e in history] == [2, 4, 6]
    best = min(history, key=lambda e: e["abs_rel"])
    info = json.loads((out / "best" / "training_info.json").read_text())
    assert info["step"] == best["step"] == summary["best_step"]
    assert info["eval_metrics"]["abs_rel"] == pytest.approx(best["abs_rel"])
    final = json.loads((out / "metrics.json").read_text())
    assert final["results"]["saved"]["num_images"] == 3
    assert final["results"]["saved"]["skipped_frames"] == ["scene_102"]
    assert json.loads((out / "eval" / "saved" / "metrics.json").read_text())["skipped_frames"] == ["scene_102"]
    assert (out / "eval" / "saved" / "samples.png").is_file()


def _outdoor_frames(folder: Path, count: int, far: float, size=(48, 64)) -> Path:
    """DenseDepth-layout frames (RGB PNG + uint16 millimetre depth PNG, listed in nyu2_train.csv and nyu2_test.csv)
    whose depth rises from 2 m at the top row to about `far` m at the bottom, with brighter pixels farther away."""
    folder.mkdir()
    height, width = size
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        depth = np.linspace(2.0, far, height, dtype=np.float32)[:, None].repeat(width, 1) * (1 + 0.02 * index)
        grey = depth / depth.max() * 200 + rng.uniform(0, 40, depth.shape)
        Image.fromarray(np.stack([grey] * 3, axis=-1).astype(np.uint8)).save(folder / f"{index:05d}_colors.png")
        Image.fromarray(np.round(depth * 1000).astype(np.uint16)).save(folder / f"{index:05d}_depth.png")
        rows.append(f"{index:05d}_colors.png,{index:05d}_depth.png")
    for name in ("nyu2_train.csv", "nyu2_test.csv"):
        (folder / name).write_text("\n".join(rows) + "\n")
    return folder


def test_an_80_m_model_trains_and_evaluates_on_its_own_depth_range(run_train, tmp_path, monkeypatch):
    """A tiny model with max_depth=80 on frames up to ~63 m: the loss sees the labels beyond the NYU range (10 m),
    and both the final evaluation of train.py and examples/evaluate.py without depth flags clamp to [min_depth, 80].
    (The range used to be 10 m wherever it was not passed on: data, evaluation, reports.)"""
    from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation
    from tiny_models import save_tiny_checkpoint

    nyu_max = MoADepthCLIPConfig().max_depth
    frames = _outdoor_frames(tmp_path / "outdoor", count=4, far=60.0)
    save_tiny_checkpoint(tmp_path / "start", max_depth=80.0)

    seen = []  # per training forward: (supervised pixels beyond the NYU range, supervised pixels, deepest label)
    forward = MoADepthCLIPForDepthEstimation.forward

    def spy(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        labels = kwargs.get("labels")
        if labels is not None:
            supervised = outputs.valid_label_mask  # the pixels the loss was computed on
            seen.append((int((supervised & (labels > nyu_max)).sum()), int(supervised.sum()),
                         float(labels[supervised].max())))
        return outputs

    monkeypatch.setattr(MoADepthCLIPForDepthEstimation, "forward", spy)
    out = tmp_path / "run"
    summary = run_train(
        "--model", tmp_path / "start", "--dataset", frames, "--no_augmentation", "--per_device_train_batch_size", 2,
        "--max_train_steps", 2, "--eval_steps", 1, "--learning_rate", 1e-3, "--checkpointing_steps", 0,
        "--test_datasets", f"{frames}:test", "--final_eval_model", "final", "--output_dir", out,
    )
    assert len(seen) == 2 and summary["global_step"] == 2
    beyond, supervised, deepest = map(sum, zip(*seen))
    assert beyond > 0.7 * supervised  # ~85 % of each frame lies beyond 10 m
    assert max(d for _, _, d in seen) > 55.0
    assert [e["step"] for e in summary["eval_history"]] == [1, 2]

    label = "outdoor"
    final = json.loads((out / "metrics.json").read_text())["results"][label]
    assert final["protocol"]["clamp_range_m"] == [MoADepthCLIPConfig().min_depth, 80.0]
    assert final["num_images"] == 4 and final["protocol"]["valid_gt"].endswith(", 80] m")
    assert json.loads((out / "eval" / label / "metrics.json").read_text())["protocol"]["clamp_range_m"][1] == 80.0
    assert "clamped to [0.001, 80] m" in (out / "metrics.md").read_text()

    completed = subprocess.run(
        [sys.executable, str(EXAMPLES / "evaluate.py"), "--model", str(out / "final"), "--dataset", str(frames),
         "--output_dir", str(tmp_path / "eval")],
        capture_output=True, text=True, env=_subprocess_env(), timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["protocol"]["clamp_range_m"] == [MoADepthCLIPConfig().min_depth, 80.0]
    assert metrics["num_images"] == 4 and metrics["num_skipped"] == 0
    assert "clamp [0.001, 80] m" in completed.stdout
    # and the same numbers as the final evaluation in train.py: one evaluation function
    assert metrics["abs_rel"] == pytest.approx(final["abs_rel"], rel=1e-5)


# ------------------------------------------------------------------------------------------------
# Several processes
# ------------------------------------------------------------------------------------------------


def test_two_process_training_and_evaluation_count_every_frame_once(nyu_sample_dir, tmp_path):
    """Two real CPU processes under `accelerate launch`: training runs, and evaluating the 25 (odd) NYU frames, in
    the training script's final evaluation and in evaluate.py, counts each frame exactly once.

    accelerate 1.x starts a single process for `accelerate launch --cpu --num_processes 2` unless MPI is configured
    (its simple launcher ignores the count), so the two processes come from its torchrun launcher
    (`--multi_gpu`) with `ACCELERATE_USE_CPU=true`, which makes each of them a gloo CPU rank; the test checks that
    the evaluation really ran on 2 processes."""
    launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
              "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    out = tmp_path / "train"
    train = subprocess.run(
        [str(a) for a in launch + [EXAMPLES / "train.py", "--config_name", "tiny", "--dataset", nyu_sample_dir,
                                   "--max_train_samples", 8, "--per_device_train_batch_size", 2, "--max_train_steps", 3,
                                   "--eval_split", "none", "--test_datasets", f"{nyu_sample_dir}:test",
                                   "--checkpointing_steps", 0, "--output_dir", out]],
        env=_subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert train.returncode == 0, train.stderr[-3000:]
    summary = json.loads((out / "metrics.json").read_text())
    (label, nyu_result), = summary["results"].items()
    assert nyu_result["num_images"] == 25 and nyu_result["protocol"]["num_processes"] == 2

    evaluated = subprocess.run(
        [str(a) for a in launch + [EXAMPLES / "evaluate.py", "--model", out / "final", "--dataset", nyu_sample_dir,
                                   "--output_dir", tmp_path / "eval", "--save_predictions", "--batch_size", 4]],
        env=_subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert evaluated.returncode == 0, evaluated.stderr[-3000:]
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["num_images"] == 25 and metrics["protocol"]["num_processes"] == 2
    rows = (tmp_path / "eval" / "per_image_metrics.csv").read_text().strip().splitlines()[1:]
    names = [row.split(",")[0] for row in rows]
    assert len(names) == 25 == len(set(names))
    predictions = sorted((tmp_path / "eval" / "predictions").glob("*.npy"))
    assert [p.stem for p in predictions] == sorted(names)
    # the saved predictions are what was scored: recompute one frame's metrics from its file
    from modeling_moa_depthclip.data import load_depth_dataset

    frame = load_depth_dataset(nyu_sample_dir, split="test")[0]
    prediction = np.load(tmp_path / "eval" / "predictions" / f"{frame['name']}.npy")
    assert prediction.dtype == np.float32 and prediction.shape == (480, 640)
    model, processor = load_model_and_processor(str(out / "final"))
    recomputed = compute_depth_metrics(prediction, frame["depth"], model.config.min_depth, model.config.max_depth)
    stored = dict(zip(METRIC_KEYS, map(float, rows[names.index(frame["name"])].split(",")[1:])))
    for key in METRIC_KEYS:
        assert stored[key] == pytest.approx(recomputed[key], rel=1e-4, abs=1e-6), key
    # the model evaluated in-process gives the same average (process split changes nothing)
    single = evaluation.evaluate(model, processor, load_depth_dataset(nyu_sample_dir, split="test"),
                                      show_progress=False)
    for key in METRIC_KEYS:
        assert metrics[key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6), key


# ------------------------------------------------------------------------------------------------
# Errors before training
# ------------------------------------------------------------------------------------------------


def _error_of(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in argv])
    assert exit_info.value.code == 2
    return capsys.readouterr().err.strip().splitlines()[-1]


def test_bad_inputs_fail_with_one_clear_line_before_training(tmp_path, capsys, run_train):
    out = tmp_path / "out"
    missing = _error_of(train_script.main, ["--dataset", tmp_path / "no_such_folder", "--output_dir", out], capsys)
    assert "not found" in missing and "no_such_folder" in missing
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "index.csv").write_text("")
    empty = _error_of(train_script.main, ["--dataset", tmp_path / "empty", "--output_dir", out], capsys)
    assert "--dataset" in empty and "no samples" in empty
    assert "unrecognized arguments: --bogus" in _error_of(train_script.main, ["--bogus"], capsys)
    assert "--model" in _error_of(train_script.main, ["--model", tmp_path / "no_model", "--output_dir", out], capsys)
    assert "--max_train_steps: expected a positive integer, got 0" in _error_of(
        train_script.main, ["--max_train_steps", "0"], capsys
    )
    assert not out.exists()  # nothing was started

    # a user's non-empty folder is never written into without --overwrite_output_dir
    user = tmp_path / "user"
    user.mkdir()
    (user / "notes.txt").write_text("mine")
    assert "--overwrite_output_dir" in _error_of(
        train_script.main, ["--config_name", "tiny", "--output_dir", user], capsys
    )
    assert sorted(p.name for p in user.iterdir()) == ["notes.txt"]
    # the same output-folder rule as evaluate.py's: a file in the way is named
    assert f"--output_dir: output folder {user / 'notes.txt'} is a file" in _error_of(
        train_script.main, ["--config_name", "tiny", "--output_dir", user / "notes.txt"], capsys
    )


    # and as a real command: nonzero exit, one line
    result = subprocess.run([sys.executable, str(EXAMPLES / "train.py"), "--bogus"], capture_output=True, text=True,
                            env=_subprocess_env(), timeout=120)
    assert result.returncode == 2 and "unrecognized arguments: --bogus" in result.stderr.strip().splitlines()[-1]
