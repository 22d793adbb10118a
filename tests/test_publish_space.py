"""python -m conversion.publish --space: the demo as a Gradio Space running a model, with a recording Hub client."""

import configparser
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import pytest
from huggingface_hub import metadata_load


from conftest import REPO_ROOT  # noqa: E402
from conversion import publish  # noqa: E402

SPACE, MODEL = "someone/depth-demo", "someone/tiny-moa"


class SpaceRecordingHfApi:
    """Stands in for huggingface_hub.HfApi: records each call and keeps a copy of what would be uploaded."""

    calls: list = []
    uploaded: Path | None = None

    def __init__(self, token=None):
        self.calls.append(("HfApi", {"token": token}))

    def create_repo(self, **kwargs):
        self.calls.append(("create_repo", kwargs))
        prefix = "spaces/" if kwargs.get("repo_type") == "space" else ""
        return f"https://huggingface.co/{prefix}{kwargs['repo_id']}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))
        if kwargs.get("repo_type") == "space":
            shutil.copytree(kwargs["folder_path"], self.uploaded, dirs_exist_ok=True)


@pytest.fixture
def hub(monkeypatch, tmp_path):
    SpaceRecordingHfApi.calls = []
    SpaceRecordingHfApi.uploaded = tmp_path / "uploaded"
    monkeypatch.setattr(publish, "HfApi", SpaceRecordingHfApi)
    return SpaceRecordingHfApi


def test_space_upload_carries_the_app_the_package_and_a_card_naming_the_model(hub, monkeypatch, capsys):
    assert publish.main(["--space", SPACE, "--repo_id", MODEL]) == 0
    assert f"https://huggingface.co/spaces/{SPACE}" in capsys.readouterr().out
    assert [name for name, _ in hub.calls] == ["HfApi", "create_repo", "upload_folder"]
    calls = dict(hub.calls)
    assert calls["create_repo"] == {"repo_id": SPACE, "repo_type": "space", "space_sdk": "gradio", "private": False,
                                    "exist_ok": True}  # fmt: skip
    upload = calls["upload_folder"]
    assert (upload["repo_id"], upload["repo_type"]) == (SPACE, "space") and "*.pyc" in upload["ignore_patterns"]
    assert not Path(upload["folder_path"]).exists()  # the staging folder is cleaned up

    space = hub.uploaded
    assert (space / "app.py").read_bytes() == (REPO_ROOT / "demo" / "app.py").read_bytes()
    card = metadata_load(space / "README.md")
    assert card["models"] == [MODEL] and card["sdk"] == "gradio" and card["app_file"] == "app.py"
    assert card["title"] == metadata_load(REPO_ROOT / "demo" / "README.md")["title"]
    staged = space / "modeling_moa_depthclip"
    package = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    source = REPO_ROOT / "modeling_moa_depthclip"
    assert package == sorted(str(p.relative_to(source)) for p in source.rglob("*.py"))  # no caches, subpackages too
    assert "geometry/point_cloud.py" in package and "__init__.py" in package

    # the uploaded app runs the card's model when no --model is given
    monkeypatch.delenv("MOA_DEPTHCLIP_MODEL", raising=False)
    spec = importlib.util.spec_from_file_location("moa_depthclip_space_app", space / "app.py")
    pytest.importorskip("gradio")
    app = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, app)  # Gradio looks up where component classes are defined
    spec.loader.exec_module(app)
    assert app.build_parser().parse_args([]).model == MODEL
    monkeypatch.setenv("MOA_DEPTHCLIP_MODEL", "other/model")
    assert app.build_parser().parse_args([]).model == "other/model"


def test_space_requirements_are_the_package_requirements():
    setup = configparser.ConfigParser()
    setup.read(REPO_ROOT / "setup.cfg")
    needed = [line.strip() for line in setup["options"]["install_requires"].splitlines() if line.strip()]
    listed = [line.strip() for line in (REPO_ROOT / "demo" / "requirements.txt").read_text().splitlines()
              if line.strip() and not line.startswith("#")]  # fmt: skip
    assert sorted(listed) == sorted(needed)
    # the Space's Gradio is the card's sdk_version, inside the demo extra's range
    version = metadata_load(REPO_ROOT / "demo" / "README.md")["sdk_version"]
    extra = next(line for line in setup["options.extras_require"]["demo"].splitlines() if line.startswith("gradio"))
    low, high = re.fullmatch(r"gradio>=([\d.]+),<([\d.]+)", extra.strip()).groups()
    as_tuple = lambda text: tuple(int(part) for part in text.split("."))  # noqa: E731
    assert as_tuple(low) <= as_tuple(version) < as_tuple(high)


def test_model_and_space_together_upload_the_model_first(hub, monkeypatch, tmp_path):
    monkeypatch.setattr(publish, "verify_loads", lambda path, timeout=600: {})
    monkeypatch.setattr(publish, "check_folder", lambda folder: None)
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "README.md").write_text("card")
    assert publish.main(["--folder", str(folder), "--repo_id", MODEL, "--space", SPACE, "--private"]) == 0
    repos = [(kwargs["repo_id"], kwargs["repo_type"], kwargs["private"]) for name, kwargs in hub.calls
             if name == "create_repo"]  # fmt: skip
    assert repos == [(MODEL, "model", True), (SPACE, "space", True)]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--space", "not a repo", "--repo_id", MODEL], "space must look like"),
        (["--space", SPACE, "--repo_id", "nouser"], "repo_id must look like"),
    ],
)
def test_bad_space_arguments_are_one_clear_error(hub, argv, message, capsys):
    assert publish.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert hub.calls == []  # nothing reached the Hub


def test_space_upload_failure_is_one_clear_error(hub, monkeypatch, capsys):
    def forbidden(self, **kwargs):
        raise RuntimeError("403 Forbidden: you cannot create a Space here")

    monkeypatch.setattr(SpaceRecordingHfApi, "create_repo", forbidden)
    assert publish.main(["--space", SPACE, "--repo_id", MODEL]) == 2
    err = capsys.readouterr().err
    assert f"uploading the demo to Space {SPACE} failed (RuntimeError): 403 Forbidden" in err
    assert "upload_folder" not in dict(hub.calls)


def test_neither_folder_nor_space_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        publish.main(["--repo_id", MODEL])
    assert exit_info.value.code == 2 and "--folder" in capsys.readouterr().err
