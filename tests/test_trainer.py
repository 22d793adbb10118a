"""The model in `transformers.Trainer`: gradient accumulation, what predictions keep, metrics, a `datasets` run."""

import dataclasses

import numpy as np
import pytest
import torch
from transformers import Trainer, TrainingArguments

from modeling_moa_depthclip import MoADepthCLIPDepthEstimatorOutput
from modeling_moa_depthclip.data import DepthCollator, load_depth_dataset
from modeling_moa_depthclip.evaluation.metrics import METRIC_KEYS, DepthMetricsAccumulator
from modeling_moa_depthclip.training.trainer_metrics import DepthMetrics
from tiny_models import tiny_model, tiny_processor


INPUT_SIZE = (64, 64)


def trainer_args(tmp_path, **overrides):
    settings = dict(
        output_dir=str(tmp_path / "trainer"), report_to=[], use_cpu=True, save_strategy="no", logging_strategy="no",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True, seed=0,
    )
    settings.update(overrides)
    return TrainingArguments(**settings)


def parameter_update(tmp_path, frames, batch_size, accumulation):
    """Change of every trainable parameter after one optimizer step of plain SGD (update = -lr * gradient)."""
    model = tiny_model().train()
    before = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    args = trainer_args(
        tmp_path / f"b{batch_size}a{accumulation}", per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=accumulation, max_steps=1, learning_rate=1e-2, optim="sgd",
        lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0,
    )
    Trainer(model=model, args=args, train_dataset=frames, data_collator=DepthCollator(tiny_processor(), INPUT_SIZE)).train()
    return torch.cat([(p.detach() - before[name]).flatten() for name, p in model.named_parameters() if name in before])


def test_gradient_accumulation_gives_the_update_of_the_full_batch_on_real_frames(nyu_sample_dataset, tmp_path):
    frames = nyu_sample_dataset[:2]
    full = parameter_update(tmp_path, frames, batch_size=2, accumulation=1)
    accumulated = parameter_update(tmp_path, frames, batch_size=1, accumulation=2)
    assert full.abs().max() > 0
    # the composite loss of a batch of two is close to, not exactly, the mean of the two per-image losses
    ratio = accumulated.norm() / full.norm()
    assert abs(ratio - 1) < 0.05, f"accumulated update is {ratio:.3f}x the full-batch update"
    cosine = torch.nn.functional.cosine_similarity(accumulated, full, dim=0)
    assert cosine > 0.99


def test_trainer_does_not_hand_the_model_loss_kwargs(tmp_path):
    trainer = Trainer(model=tiny_model(), args=trainer_args(tmp_path))
    assert trainer.model_accepts_loss_kwargs is False


def test_prediction_keeps_only_the_depth(nyu_sample_dataset, tmp_path):
    model = tiny_model()
    frames = nyu_sample_dataset[:3]
    trainer = Trainer(
        model=model, args=trainer_args(tmp_path, per_device_eval_batch_size=2),
        data_collator=DepthCollator(tiny_processor(), INPUT_SIZE),
    )
    output = trainer.predict(frames)
    assert isinstance(output.predictions, np.ndarray)
    assert output.predictions.shape == (3, *INPUT_SIZE)
    assert output.predictions.nbytes == 3 * INPUT_SIZE[0] * INPUT_SIZE[1] * 4  # no per-bin logits beside it
    batch = DepthCollator(tiny_processor(), INPUT_SIZE)(frames)
    with torch.no_grad():
        expected = model(pixel_values=batch["pixel_values"]).predicted_depth.numpy()
    np.testing.assert_allclose(output.predictions, expected, rtol=1e-5, atol=1e-5)
    assert output.label_ids.shape == (3, *INPUT_SIZE)


def test_every_output_but_the_depth_is_ignored_at_inference():
    fields = {field.name for field in dataclasses.fields(MoADepthCLIPDepthEstimatorOutput)}
    config = tiny_model().config
    assert set(config.keys_to_ignore_at_inference) == fields - {"loss", "predicted_depth"}
    # a class attribute: not written to config.json
    assert "keys_to_ignore_at_inference" not in config.to_dict()


def test_evaluate_reports_the_package_metrics_in_the_config_depth_range(nyu_sample_dataset, tmp_path):
    model = tiny_model(max_depth=8.0)
    frames = nyu_sample_dataset[:3]
    collator = DepthCollator(tiny_processor(), INPUT_SIZE)
    batch = collator(frames)
    with torch.no_grad():
        depth = model(pixel_values=batch["pixel_values"]).predicted_depth
    expected = DepthMetricsAccumulator(min_depth=model.config.min_depth, max_depth=8.0, crop="eigen")
    expected.update(depth, batch["labels"])
    expected = expected.compute()

    results = {}
    for batched in (False, True):
        trainer = Trainer(
            model=model,
            args=trainer_args(tmp_path / str(batched), per_device_eval_batch_size=2, batch_eval_metrics=batched),
            data_collator=collator, compute_metrics=DepthMetrics(model.config, crop="eigen"),
        )
        results[batched] = trainer.evaluate(frames)
    for metrics in results.values():
        for key in METRIC_KEYS:
            assert metrics[f"eval_{key}"] == pytest.approx(expected[key], rel=1e-4, abs=1e-6), key
        assert np.isfinite(metrics["eval_loss"])
    # with the default 10 m range the ground truth beyond 8 m would count: the range really comes from the config
    wide = DepthMetricsAccumulator(min_depth=model.config.min_depth, max_depth=10.0, crop="eigen")
    wide.update(depth, batch["labels"])
    assert wide.compute()["rmse"] != pytest.approx(expected["rmse"], rel=1e-6)


def test_metrics_name_a_model_that_returns_more_than_the_depth():
    from transformers import EvalPrediction

    metrics = DepthMetrics(tiny_model().config)
    with pytest.raises(ValueError, match="keys_to_ignore_at_inference"):
        metrics(EvalPrediction(predictions=(np.ones((1, 8, 8)), np.ones((1, 4, 8, 8))), label_ids=np.ones((1, 8, 8))))


def test_fine_tuning_with_trainer_on_a_datasets_dataset(nyu_sample_dir, tmp_path):
    """The README's recipe, on a `datasets.Dataset` built from real NYU frames."""
    import datasets

    rows = [line.split(",") for line in (nyu_sample_dir / "index.csv").read_text().split()[:6]]
    features = datasets.Features({"image": datasets.Image(), "depth_map": datasets.Image()})

    def table(part):
        return datasets.Dataset.from_dict(
            {"image": [str(nyu_sample_dir / rgb) for rgb, _ in part], "depth_map": [str(nyu_sample_dir / d) for _, d in part]},
            features=features,
        )

    datasets.DatasetDict({"train": table(rows[:4]), "test": table(rows[4:])}).save_to_disk(tmp_path / "nyu")
    train, test = load_depth_dataset(tmp_path / "nyu", "train"), load_depth_dataset(tmp_path / "nyu", "test")
    assert len(train) == 4 and len(test) == 2

    model = tiny_model().train()
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trainer = Trainer(
        model=model,
        args=trainer_args(tmp_path, per_device_train_batch_size=2, per_device_eval_batch_size=2, max_steps=2,
                          learning_rate=1e-3, eval_strategy="steps", eval_steps=2),
        train_dataset=train, eval_dataset=test,
        data_collator=DepthCollator(tiny_processor(), INPUT_SIZE),
        compute_metrics=DepthMetrics(model.config, crop="eigen"),
    )
    trainer.train()
    metrics = trainer.evaluate()
    assert {f"eval_{key}" for key in METRIC_KEYS} <= metrics.keys()
    assert all(np.isfinite(metrics[f"eval_{key}"]) for key in METRIC_KEYS)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
