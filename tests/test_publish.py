"""conversion/publish.py and conversion/model_card.py, offline: `HfApi` is replaced by a recorder."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, metadata_load


from conversion import convert_clip_to_moa_depthclip as converter  # noqa: E402
from conversion import publish  # noqa: E402
from conversion.model_card import (  # noqa: E402
    DEFAULT_TEMPLATE,
    ModelCardError,
    render_model_card,
    update_model_card_results,
)
from test_clip_checkpoints import IMAGE  # noqa: E402
from test_conversion import PROMPT_TEXTS, make_clip_tokenizer, openai_state_dict_for  # noqa: E402
from tiny_models import tiny_config  # noqa: E402

SAMPLE_METRICS = {
    "d1": 0.61234, "d2": 0.8712, "d3": 0.9543, "abs_rel": 0.2345, "sq_rel": 0.1789, "rmse": 0.6789,
    "rmse_log": 0.2711, "log10": 0.0981, "silog": 21.4567, "num_images": 654,
    "protocol": {"dataset": "NYU Depth V2 (Eigen test split)", "crop": "eigen", "min_depth": 0.001,
                 "max_depth": 10.0, "averaging": "per image"},
}  # fmt: skip
REPO = "someone/tiny-moa"
CONFIG = tiny_config()


class RecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records each call, uploads nothing."""

    calls: list = []

    def __init__(self, token=None):
        self.calls.append(("HfApi", {"token": token}))

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        return f"https://huggingface.co/{kwargs['repo_id']}"

    def create_branch(self, **kwargs):
        self.calls.append(("create_branch", kwargs))

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


@pytest.fixture
def hub(monkeypatch):
    RecordingHfApi.calls = []
    monkeypatch.setattr(publish, "HfApi", RecordingHfApi)
    return RecordingHfApi.calls


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A folder written by the CLIP converter from a tiny OpenAI-layout CLIP."""
    root = tmp_path_factory.mktemp("publish")
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    tokenizer.save_pretrained(root / "tokenizer")
    torch.save(openai_state_dict_for(tokenizer), root / "ViT-tiny.pt")
    output = root / "tiny-moa"
    assert converter.main([
        "--clip_model", str(root / "ViT-tiny.pt"), "--tokenizer", str(root / "tokenizer"), "--output_dir", str(output),
        "--moa_layers", "0", "1", "--num_unfrozen_layers", "1", "--image_size", str(IMAGE), str(IMAGE),
    ]) == 0  # fmt: skip
    return output


@pytest.fixture
def folder(checkpoint, tmp_path):
    copy = tmp_path / "tiny-moa"
    shutil.copytree(checkpoint, copy)
    return copy


@pytest.fixture
def metrics_file(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(SAMPLE_METRICS))
    return path


# ---------------------------------------------------------------- publishing


def test_checked_in_a_fresh_process_then_uploaded(folder, metrics_file, hub, monkeypatch):
    real_verify = publish.verify_loads
    seen = {}

    def verify_and_record(path, timeout=600):
        hub.append(("verify_loads", {"folder": Path(path)}))
        seen.update(real_verify(path, timeout=timeout))  # the real check: a subprocess without the package
        return seen

    monkeypatch.setattr(publish, "verify_loads", verify_and_record)
    url = publish.publish_folder(
        folder, REPO, private=True, revision="experiment", commit_message="first upload", metrics=metrics_file
    )
    assert url == f"https://huggingface.co/{REPO}/tree/experiment"
    assert [name for name, _ in hub] == ["verify_loads", "HfApi", "create_repo", "create_branch", "upload_folder"]
    calls = dict(hub)
    assert calls["HfApi"] == {"token": None}  # the usual login or HF_TOKEN
    assert calls["create_repo"] == {"repo_id": REPO, "private": True, "exist_ok": True, "repo_type": "model"}
    assert calls["create_branch"] == {"repo_id": REPO, "branch": "experiment", "exist_ok": True, "repo_type": "model"}
    upload = calls["upload_folder"]
    assert (upload["repo_id"], upload["folder_path"], upload["revision"]) == (REPO, str(folder), "experiment")
    assert upload["commit_message"] == "first upload" and "*.pyc" in upload["ignore_patterns"]

    # the fresh process used the folder's own code, not the package
    assert "transformers_modules" in seen["model_class"] and seen["input_size"] == [IMAGE, IMAGE]
    low, high = seen["depth_range"]
    assert 1e-3 <= low <= high <= 10.0

    # --metrics refreshed the card: numbers in the table and in model-index
    card = (folder / "README.md").read_text()
    assert "| 0.6123 | 0.8712 | 0.9543 | 0.2345 | 0.1789 | 0.6789 | 0.2711 | 0.0981 | 21.4567 |" in card
    assert "No evaluation yet" not in card and "Converted, not trained" in card  # the rest of the card is kept
    values = {r.metric_type: r.metric_value for r in ModelCard(card).data.eval_results}
    assert values == {k: v for k, v in SAMPLE_METRICS.items() if k not in ("num_images", "protocol")}


def test_main_uploads_to_main_and_prints_the_url(folder, hub, monkeypatch, capsys):
    monkeypatch.setattr(publish, "verify_loads", lambda path, timeout=600: {})  # checked for real above
    assert publish.main(["--folder", str(folder), "--repo_id", REPO]) == 0
    assert f"https://huggingface.co/{REPO}" in capsys.readouterr().out
    calls = dict(hub)
    assert "create_branch" not in calls and calls["upload_folder"]["revision"] is None
    assert calls["create_repo"]["private"] is False


def test_upload_failure_is_one_clear_error(folder, hub, monkeypatch, capsys):
    monkeypatch.setattr(publish, "verify_loads", lambda path, timeout=600: {})

    def unauthorized(self, **kwargs):
        raise RuntimeError("401 Client Error: Unauthorized\nInvalid credentials in Authorization header")

    monkeypatch.setattr(RecordingHfApi, "create_repo", unauthorized)
    assert publish.main(["--folder", str(folder), "--repo_id", REPO]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert f"uploading {folder} to {REPO} failed (RuntimeError): 401 Client Error: Unauthorized Invalid" in err
    assert "upload_folder" not in dict(hub)


def _remove_weights(folder):
    (folder / "model.safetensors").unlink()


def _corrupt_config(folder):
    (folder / "config.json").write_text('{"model_type": "moa_depthclip", "auto_map": ')


def _add_pickle(folder):
    torch.save({"w": torch.zeros(1)}, folder / "pytorch_model.bin")


def _remove_imported_code(folder):
    (folder / "losses.py").unlink()  # imported by modeling_moa_depthclip.py


def _truncate_weights(folder):
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[: len(data) // 3])


@pytest.mark.parametrize(
    "damage, reason",
    [
        (_remove_weights, "missing model.safetensors"),
        (_corrupt_config, "config.json is not valid JSON"),
        (_add_pickle, "pickle files ['pytorch_model.bin']"),
        (_remove_imported_code, "missing code file losses.py"),
        (_truncate_weights, "model.safetensors cannot be read"),
    ],
    ids=["no-weights", "corrupt-config", "pickle", "no-code", "truncated-weights"],
)
def test_broken_folder_is_refused_before_any_upload(folder, damage, reason, hub, monkeypatch, capsys):
    damage(folder)
    monkeypatch.setattr(publish, "verify_loads", lambda *a, **k: pytest.fail("file checks must refuse first"))
    assert publish.main(["--folder", str(folder), "--repo_id", REPO]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and reason in err and len(err.strip().splitlines()) == 1
    assert hub == []


def test_weights_that_do_not_fit_the_config_are_refused_by_the_load_check(folder, hub):
    config = json.loads((folder / "config.json").read_text())
    config["num_depth_bins"] = 8  # the stored head has 128 bins: transformers would re-initialise it
    (folder / "config.json").write_text(json.dumps(config))
    publish.check_folder(folder)  # the files themselves are fine
    with pytest.raises(publish.PublishError, match=r"mismatched weights \['head.bin_classifier.bias'"):
        publish.publish_folder(folder, REPO)
    assert hub == []


def test_bad_metrics_file_is_refused_before_any_check(folder, tmp_path, hub):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**SAMPLE_METRICS, "rmse": float("nan")}))
    with pytest.raises(ModelCardError, match="rmse must be a finite number"):
        publish.publish_folder(folder, REPO, metrics=bad)
    with pytest.raises(publish.PublishError, match="user-or-org/name"):
        publish.publish_folder(folder, "not a repo id")
    assert hub == []


def test_convert_push_to_hub_publishes_the_written_folder(tmp_path, monkeypatch, capsys):
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    torch.save(openai_state_dict_for(tokenizer), tmp_path / "ViT-tiny.pt")
    pushed = []

    def fake_publish(folder, repo_id, **kwargs):
        pushed.append((Path(folder), repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    monkeypatch.setattr(publish, "publish_folder", fake_publish)
    output = tmp_path / "out"
    args = ["--clip_model", str(tmp_path / "ViT-tiny.pt"), "--tokenizer", str(tmp_path / "tokenizer"),
            "--moa_layers", "0", "1", "--num_unfrozen_layers", "1", "--push_to_hub", "someone/depth", "--private"]
    assert converter.main([*args, "--output_dir", str(output)]) == 0  # fmt: skip
    assert pushed == [(output, "someone/depth", {"private": True})]
    assert "published: https://huggingface.co/someone/depth" in capsys.readouterr().out
    card = (output / "README.md").read_text()
    assert "# depth\n" in card and 'model="someone/depth"' in card

    def refuse(folder, repo_id, **kwargs):
        raise publish.PublishError("simulated refusal")

    monkeypatch.setattr(publish, "publish_folder", refuse)
    assert converter.main([*args, "--output_dir", str(tmp_path / "out2")]) == 2
    assert "written but not published: simulated refusal" in capsys.readouterr().err


# ---------------------------------------------------------------- the model card


def test_template_metadata():
    text = DEFAULT_TEMPLATE.read_text()
    metadata = yaml.safe_load(text.split("---\n")[1])
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "depth-estimation"
    assert metadata["license"] == "apache-2.0" and "model-index" not in metadata
    tags = {"depth-estimation", "monocular-depth", "clip", "mixture-of-adapters", "nyu-depth-v2"}
    assert tags <= set(metadata["tags"])
    assert metadata["datasets"] == ["sayakpaul/nyu_depth_v2"]
    for section in ("## The method", "## How to use", "## Training recipe", "## Evaluation protocol", "## Results",
                    "## Limitations", "## Citations", "trust_remote_code=True", "MIT License", "2604.01118",
                    "Can Language Understand Depth?", "Learning Transferable Visual Models",
                    "Indoor Segmentation and Support Inference"):  # fmt: skip
        assert section in text, section


def test_card_renders_an_evaluation(tmp_path):
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps({**SAMPLE_METRICS, "num_images": 25}))
    text = render_model_card(
        None, path, config=CONFIG, model_name="tiny-moa", model_id=REPO, base_model="openai/clip-vit-base-patch32"
    )
    (tmp_path / "README.md").write_text(text)
    metadata = metadata_load(tmp_path / "README.md")  # parseable YAML front matter
    assert metadata["base_model"] == "openai/clip-vit-base-patch32" and metadata["library_name"] == "transformers"
    (entry,) = metadata["model-index"]
    assert entry["name"] == "tiny-moa"
    (result,) = entry["results"]
    assert result["task"]["type"] == "depth-estimation"
    assert result["dataset"]["name"] == "NYU Depth V2 (Eigen test split)"  # the protocol's own name wins
    metrics = {m["type"]: m["value"] for m in result["metrics"]}
    assert metrics == {k: v for k, v in SAMPLE_METRICS.items() if k not in ("num_images", "protocol")}
    assert "| 0.6123 | 0.8712 | 0.9543 | 0.2345 | 0.1789 | 0.6789 | 0.2711 | 0.0981 | 21.4567 |" in text
    assert "Images evaluated: **25**" in text and "not the full 654-frame" in text
    assert "`crop`: `eigen`" in text and f'model="{REPO}"' in text and "{{" not in text
    # the paper's numbers are context in the body, never this checkpoint's metadata
    assert "| MoA-DepthCLIP (paper) | 0.745 | 0.520 |" in text
    assert not any(math.isclose(v, 0.745) or math.isclose(v, 0.520) for v in metrics.values())
    body_results = text.split("<!-- moa-depthclip:results:start -->")[1].split("<!-- moa-depthclip:results:end -->")[0]
    assert "0.745" not in body_results


def test_card_states_the_depth_range_of_its_config():
    text = render_model_card(config=tiny_config(min_depth=0.5, max_depth=80.0), model_name="outdoor")
    assert "valid ground truth in **0.5 – 80 m**" in text and "**Range 0.5–80 m.**" in text
    default = render_model_card(config=CONFIG, model_name="indoor")
    assert "valid ground truth in **0.001 – 10 m**" in default and "80 m" not in default


def test_card_without_evaluation_says_so():
    text = render_model_card(config=CONFIG, model_name="tiny-moa")
    card = ModelCard(text)
    assert "model-index" not in card.data.to_dict() and not card.data.eval_results
    assert "No evaluation yet" in text and "base_model" not in card.data.to_dict()


def test_results_refresh_keeps_the_rest_of_the_card():
    blank = render_model_card(config=CONFIG, model_name="tiny-moa", checkpoint_status="STATUS PARAGRAPH")
    evaluated = update_model_card_results(blank, SAMPLE_METRICS, model_name="tiny-moa")
    assert "STATUS PARAGRAPH" in evaluated and "No evaluation yet" not in evaluated
    assert len(ModelCard(evaluated).data.eval_results) == 9
    again = update_model_card_results(evaluated, {**SAMPLE_METRICS, "rmse": 0.5}, model_name="tiny-moa")
    assert "0.6789" not in again.split("### Reported by the paper")[0]
    assert update_model_card_results(evaluated, None, model_name="tiny-moa") == blank
    with pytest.raises(ModelCardError, match="no results section"):
        update_model_card_results("---\nlicense: mit\n---\n# hand-written\n", SAMPLE_METRICS, model_name="x")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"rmse": None}, "rmse must be a finite number"),
        ({"num_images": 0}, "num_images must be a positive integer"),
        ({"protocol": "eigen"}, "protocol must be an object"),
    ],
)
def test_invalid_evaluation_json_is_named(change, message):
    with pytest.raises(ModelCardError, match=message):
        render_model_card(None, {**SAMPLE_METRICS, **change}, config=CONFIG, model_name="x")
    incomplete = {k: v for k, v in SAMPLE_METRICS.items() if k != "silog"}
    with pytest.raises(ModelCardError, match=r"lacks \['silog'\]"):
        render_model_card(None, incomplete, config=CONFIG, model_name="x")
