"""Publish a MoA-DepthCLIP checkpoint folder to the Hugging Face Hub, after proving that it loads.

    python -m conversion.publish --folder DIR --repo_id USER/NAME [--private] [--revision BRANCH]
                                 [--commit_message MSG] [--metrics metrics.json]
    python -m conversion.publish --space USER/SPACE --repo_id USER/NAME [--folder DIR] [--private]

Before anything is uploaded the folder must pass, in this order:

1. its files: config.json (a `moa_depthclip` or `depthclip_zero_shot` config with `auto_map`), model.safetensors (readable),
   preprocessor_config.json, every code file that `auto_map` names and that those files import, and no pickle
   files (`.bin`, `.pt`, `.pth`, `.pkl`, `.ckpt`: loading a pickle can run code);
2. a load in a fresh Python process where the `modeling_moa_depthclip` package cannot be imported:
   `AutoModelForDepthEstimation` and `AutoImageProcessor` with `trust_remote_code=True` (the folder's own code),
   with every weight of model.safetensors fitting the config (no missing, unexpected or mismatched keys), then a
   forward pass on a dummy image whose depth must be finite and within the configured range.

`--metrics` refreshes the README.md model card (results table and `model-index`) from an evaluation JSON; a folder
without README.md gets the card rendered from MODEL_CARD.md. The upload uses `huggingface_hub`
(`create_repo(exist_ok=True)`, `create_branch` for a `--revision` other than main, `upload_folder`); the token
comes from `hf auth login` or `HF_TOKEN`.

`--space` uploads the browser demo (`demo/`: app.py, requirements.txt, the README.md Space card) as a Gradio Space
whose card names `--repo_id` under `models:`, the model the app loads; the `modeling_moa_depthclip` package goes
beside app.py. With `--folder` too, the model is checked and uploaded first.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

if __package__ in (None, ""):
    sys.exit(f"run this from the repository root as a module: python -m conversion.{Path(__file__).stem} ...")

from huggingface_hub import HfApi  # noqa: E402

from conversion.model_card import (  # noqa: E402
    ModelCardError,
    load_metrics,
    render_model_card,
    update_model_card_results,
)
from modeling_moa_depthclip.loading import MODEL_TYPES, load_config  # noqa: E402

__all__ = ["PublishError", "check_folder", "main", "publish_folder", "publish_space", "stage_space", "verify_loads"]

REQUIRED_FILES = ("config.json", "model.safetensors", "preprocessor_config.json")
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")
# never uploaded: Python caches and hidden files (editor state, staging folders)
IGNORE_PATTERNS = ["*.pyc", "*__pycache__*", ".*"]
REPO_ROOT = Path(__file__).resolve().parents[1]
SPACE_FILES = ("app.py", "requirements.txt")
_REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.(\w+)\s+import\b", re.MULTILINE)


class PublishError(ValueError):
    """A folder that must not be published, or an upload that failed, with the reason."""


# --------------------------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise PublishError(f"{path.name} is not valid JSON: {error}") from None
    if not isinstance(data, dict):
        raise PublishError(f"{path.name} must hold a JSON object")
    return data


def check_folder(folder: str | os.PathLike) -> None:
    """Raise `PublishError` listing every problem of the folder's files (no model is loaded here)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise PublishError(f"{folder} is not a folder")
    problems = [f"missing {name}" for name in REQUIRED_FILES if not (folder / name).is_file()]
    if not (folder / "model.safetensors").is_file() and any(folder.glob("*.safetensors.index.json")):
        problems.append("sharded weights are not supported here: save the model as one model.safetensors")
    pickles = sorted(
        str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        problems.append(f"pickle files {pickles} (publish safetensors only; loading a pickle can run code)")

    modules: set[str] = set()
    for name, auto_class in (("config.json", "AutoModelForDepthEstimation"), ("preprocessor_config.json", None)):
        if not (folder / name).is_file():
            continue
        try:
            data = _read_json(folder / name)
        except PublishError as error:
            problems.append(str(error))
            continue
        if name == "config.json" and data.get("model_type") not in MODEL_TYPES:
            expected = " or ".join(map(repr, MODEL_TYPES))
            problems.append(f"config.json has model_type {data.get('model_type')!r}, not {expected}")
        auto_map = data.get("auto_map")
        if not isinstance(auto_map, dict) or (auto_class and auto_class not in auto_map):
            problems.append(f"{name} has no auto_map{f' for {auto_class}' if auto_class else ''}: "
                            "trust_remote_code cannot find the model's code")  # fmt: skip
            continue
        for reference in auto_map.values():
            for target in reference if isinstance(reference, list) else [reference]:
                if isinstance(target, str) and "." in target:
                    modules.add(target.rsplit(".", 1)[0].split("--")[-1])
    pending, seen = sorted(modules), set()
    while pending:
        module = pending.pop()
        if module in seen:
            continue
        seen.add(module)
        path = folder / f"{module}.py"
        if not path.is_file():
            problems.append(f"missing code file {path.name}")
            continue
        pending.extend(_RELATIVE_IMPORT.findall(path.read_text(encoding="utf-8")))

    weights = folder / "model.safetensors"
    if weights.is_file():
        try:
            from safetensors import safe_open

            with safe_open(str(weights), framework="pt") as handle:
                if not list(handle.keys()):
                    problems.append("model.safetensors holds no tensor")
        except Exception as error:  # any failure to parse the header means a broken file
            problems.append(f"model.safetensors cannot be read ({' '.join(str(error).split())})")
    if problems:
        raise PublishError(f"{folder} cannot be published: " + "; ".join(problems))


_LOAD_CHECK = textwrap.dedent(
    """
    import json, sys
    sys.modules["modeling_moa_depthclip"] = None  # only the folder's own code may define the model
    import numpy as np
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from transformers import AutoImageProcessor, AutoModelForDepthEstimation

    folder = sys.argv[1]
    # mismatched shapes are reported below rather than raised, with the keys named
    model = AutoModelForDepthEstimation.from_pretrained(folder, trust_remote_code=True, ignore_mismatched_sizes=True)
    model.eval()
    # from_pretrained only warns about weights that do not fit the config and initialises them randomly: compare
    stored = load_file(f"{folder}/model.safetensors")
    loaded = model.state_dict()
    problems = {
        "missing": sorted(set(loaded) - set(stored)),
        "unexpected": sorted(set(stored) - set(loaded)),
        "mismatched": sorted(k for k in set(stored) & set(loaded) if stored[k].shape != loaded[k].shape),
    }
    problems["not loaded"] = sorted(
        k for k in set(stored) & set(loaded)
        if k not in problems["mismatched"] and not torch.equal(stored[k], loaded[k])
    )
    for kind, keys in problems.items():
        if keys:
            more = f" and {len(keys) - 10} more" if len(keys) > 10 else ""
            sys.exit(f"model.safetensors does not fit config.json: {kind} weights {keys[:10]}{more}")
    processor = AutoImageProcessor.from_pretrained(folder, trust_remote_code=True)
    module = type(model).__module__
    if "transformers_modules" not in module:
        sys.exit(f"the model class comes from {module}, not from the folder's code")
    height, width = processor.size["height"], processor.size["width"]
    pixels = np.random.default_rng(0).integers(0, 256, (height + 11, width + 5, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    inputs = processor(images=image, return_tensors="pt")
    with torch.no_grad():
        outputs = model(**inputs)
    depth = outputs.predicted_depth
    config = model.config
    if tuple(depth.shape) != (1, height, width):
        sys.exit(f"predicted_depth has shape {tuple(depth.shape)}, expected (1, {height}, {width})")
    if not torch.isfinite(depth).all():
        sys.exit("predicted_depth is not finite")
    if depth.min() < config.min_depth or depth.max() > config.max_depth:
        sys.exit(f"predicted_depth leaves [{config.min_depth}, {config.max_depth}] m")
    resized = processor.post_process_depth_estimation(outputs, target_sizes=[(image.height, image.width)])
    print(json.dumps({
        "model_class": f"{module}.{type(model).__name__}",
        "processor_class": type(processor).__name__,
        "input_size": [height, width],
        "depth_range": [float(depth.min()), float(depth.max())],
        "post_processed_size": list(resized[0]["predicted_depth"].shape),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }))
    """
)


def verify_loads(folder: str | os.PathLike, timeout: float = 600) -> dict:
    """Load `folder` with `trust_remote_code=True` in a fresh process without the package and run a forward pass.

    Returns what the check saw (model class, input size, depth range, ...); raises `PublishError` with the
    failure's last line otherwise.
    """
    folder = Path(folder).absolute()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
    with tempfile.TemporaryDirectory() as cwd:  # nothing importable from the working directory
        try:
            completed = subprocess.run(
                [sys.executable, "-c", _LOAD_CHECK, str(folder)],
                capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout,
            )  # fmt: skip
        except subprocess.TimeoutExpired:
            raise PublishError(f"loading {folder} in a fresh process took longer than {timeout:g} s") from None
    if completed.returncode != 0:
        lines = [line for line in completed.stderr.strip().splitlines() if line.strip()]
        reason = lines[-1].strip() if lines else f"exit code {completed.returncode}"
        raise PublishError(f"{folder} does not load in a fresh process with trust_remote_code=True: {reason}")
    return json.loads(completed.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------------------------
# Publishing
# --------------------------------------------------------------------------------------------


def _refresh_card(folder: Path, metrics: dict | None, model_name: str, model_id: str) -> None:
    readme = folder / "README.md"
    if readme.is_file():
        if metrics is None:
            return
        text = update_model_card_results(readme.read_text(encoding="utf-8"), metrics, model_name=model_name)
    else:
        config = load_config(folder)  # check_folder has made sure it is one of this package's
        text = render_model_card(metrics_json=metrics, config=config, model_name=model_name, model_id=model_id)
    readme.write_text(text, encoding="utf-8")


def publish_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    metrics: str | os.PathLike | dict | None = None,
    token: str | None = None,
    timeout: float = 600,
) -> str:
    """Check `folder` (files, then a fresh-process load) and upload it to `repo_id`; returns the repository URL.

    Nothing is sent to the Hub unless every check passes. `metrics` (an evaluation JSON) refreshes README.md.
    """
    folder = Path(folder)
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id):
        raise PublishError(f"repo_id must look like 'user-or-org/name', got {repo_id!r}")
    loaded_metrics = load_metrics(metrics) if metrics is not None else None
    check_folder(folder)
    verify_loads(folder, timeout=timeout)
    model_name = repo_id.split("/")[-1]
    _refresh_card(folder, loaded_metrics, model_name, repo_id)

    api = HfApi(token=token)
    try:
        repo_url = api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
        if revision and revision != "main":
            api.create_branch(repo_id=repo_id, branch=revision, exist_ok=True, repo_type="model")
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            repo_type="model",
            revision=revision,
            commit_message=commit_message or f"Upload MoA-DepthCLIP checkpoint {model_name}",
            ignore_patterns=IGNORE_PATTERNS,
        )
    except Exception as error:  # HTTP, authentication and network errors of huggingface_hub and its client
        detail = " ".join(str(error).split()) or type(error).__name__
        raise PublishError(f"uploading {folder} to {repo_id} failed ({type(error).__name__}): {detail}") from error
    url = str(repo_url).rstrip("/")
    return f"{url}/tree/{revision}" if revision and revision != "main" else url


def stage_space(model_repo: str, destination: str | os.PathLike) -> Path:
    """Lay out the Space in `destination`: demo/app.py and requirements.txt, the card naming `model_repo`, the package."""
    from huggingface_hub import SpaceCard

    destination = Path(destination)
    demo = REPO_ROOT / "demo"
    missing = [name for name in (*SPACE_FILES, "README.md") if not (demo / name).is_file()]
    if missing:
        raise PublishError(f"the demo folder {demo} lacks {missing}")
    destination.mkdir(parents=True, exist_ok=True)
    for name in SPACE_FILES:
        shutil.copy2(demo / name, destination / name)
    card = SpaceCard.load(demo / "README.md")
    card.data.models = [model_repo]
    card.save(destination / "README.md")
    package = REPO_ROOT / "modeling_moa_depthclip"
    for source in sorted(package.rglob("*.py")):  # subpackages included
        target = destination / package.name / source.relative_to(package)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(source, target)
    return destination


def publish_space(
    space_id: str,
    model_repo: str,
    *,
    private: bool = False,
    commit_message: str | None = None,
    token: str | None = None,
) -> str:
    """Upload the demo as the Gradio Space `space_id` running `model_repo`; returns the Space's URL."""
    for what, repo in (("space", space_id), ("repo_id", model_repo)):
        if not _REPO_ID.fullmatch(repo):
            raise PublishError(f"{what} must look like 'user-or-org/name', got {repo!r}")
    api = HfApi(token=token)
    with tempfile.TemporaryDirectory(prefix="moa-depthclip-space-") as staging:
        stage_space(model_repo, staging)
        try:
            url = api.create_repo(
                repo_id=space_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True
            )
            api.upload_folder(
                repo_id=space_id,
                folder_path=staging,
                repo_type="space",
                commit_message=commit_message or f"Demo of {model_repo}",
                ignore_patterns=IGNORE_PATTERNS,
            )
        except Exception as error:  # HTTP, authentication and network errors of huggingface_hub and its client
            detail = " ".join(str(error).split()) or type(error).__name__
            raise PublishError(
                f"uploading the demo to Space {space_id} failed ({type(error).__name__}): {detail}"
            ) from error
    return str(url).rstrip("/")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m conversion.publish",
        description="Upload a MoA-DepthCLIP checkpoint folder to the Hugging Face Hub after checking its files and "
        "loading it in a fresh process with trust_remote_code=True. Token: `hf auth login` or HF_TOKEN.",
    )
    parser.add_argument(
        "--folder", default=None, help="the checkpoint folder (e.g. written by the converters); optional with --space"
    )
    parser.add_argument("--repo_id", required=True, help="Hub repository, user-or-org/name (created if needed)")
    parser.add_argument("--private", action="store_true", help="create the repository as private")
    parser.add_argument(
        "--revision", "--branch", dest="revision", default=None,
        help="branch to upload to (created from main if it does not exist); default main",
    )  # fmt: skip
    parser.add_argument("--commit_message", default=None, help="commit message of the upload")
    parser.add_argument(
        "--metrics", default=None, metavar="metrics.json",
        help="evaluation JSON (examples/evaluate.py) whose results refresh README.md's results and model-index",
    )  # fmt: skip
    parser.add_argument(
        "--space", default=None, metavar="USER/SPACE",
        help="also upload the browser demo (demo/) as a Gradio Space that runs --repo_id",
    )  # fmt: skip
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.folder is None and args.space is None:
        parser.error("give --folder (a checkpoint to publish), --space (the demo), or both")
    try:
        if args.folder is None:
            url = publish_space(args.space, args.repo_id, private=args.private, commit_message=args.commit_message)
            print(f"published the demo of {args.repo_id} to {url}")
            return 0
        url = publish_folder(
            args.folder,
            args.repo_id,
            private=args.private,
            revision=args.revision,
            commit_message=args.commit_message,
            metrics=args.metrics,
        )
    except (PublishError, ModelCardError, OSError, ValueError) as error:
        print(f"error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
        return 2
    print(f"published {args.folder} to {url}")
    if args.space is not None:
        try:
            space_url = publish_space(args.space, args.repo_id, private=args.private)
        except (PublishError, OSError, ValueError) as error:
            print(f"error: {' '.join(str(error).split()) or type(error).__name__}", file=sys.stderr)
            return 2
        print(f"published the demo of {args.repo_id} to {space_url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
