"""Render the model card (README.md) of a MoA-DepthCLIP checkpoint from `MODEL_CARD.md`.

The results table and the `model-index` metadata are generated from an evaluation JSON (the `metrics.json`
written by examples/evaluate.py: `d1, d2, d3, abs_rel, sq_rel, rmse, rmse_log, log10, silog, num_images,
protocol{...}`), never typed by hand. Without one the card says that there is no evaluation yet and has no
`model-index`.

    render_model_card(None, "metrics.json", config=model.config, model_name="moa-depthclip-nyu",
                      model_id="user/moa-depthclip-nyu")
    update_model_card_results(readme_text, "metrics.json", model_name="moa-depthclip-nyu")
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResult, ModelCardData

from modeling_moa_depthclip import DepthCLIPConfig

__all__ = [
    "DEFAULT_TEMPLATE",
    "METRICS",
    "ModelCardError",
    "config_details",
    "load_metrics",
    "render_model_card",
    "results_section",
    "update_model_card_results",
]

DEFAULT_TEMPLATE = Path(__file__).resolve().parents[1] / "MODEL_CARD.md"

# metric key of metrics.json -> (pretty name, higher is better)
METRICS: dict[str, tuple[str, bool]] = {
    "d1": ("δ1 < 1.25", True),
    "d2": ("δ2 < 1.25²", True),
    "d3": ("δ3 < 1.25³", True),
    "abs_rel": ("AbsRel", False),
    "sq_rel": ("SqRel", False),
    "rmse": ("RMSE (m)", False),
    "rmse_log": ("RMSE (log)", False),
    "log10": ("log10", False),
    "silog": ("SILog", False),
}
EIGEN_TEST_FRAMES = 654
RESULTS_START = "<!-- moa-depthclip:results:start -->"
RESULTS_END = "<!-- moa-depthclip:results:end -->"
NO_EVALUATION = (
    "**No evaluation yet.** This checkpoint has not been evaluated, so this card reports no results of its own "
    "and its metadata carries no `model-index`. Evaluate it with `examples/evaluate.py` and publish with "
    "`python -m conversion.publish --metrics metrics.json` to fill this section from the evaluation output."
)

_PLACEHOLDER = re.compile(r"\{\{\s*(\w+)\s*\}\}")
# the template's note to its editors, dropped from rendered cards
_TEMPLATE_NOTE = re.compile(r"<!--\s*Template of the model card.*?-->\n+", re.DOTALL)
_FRONT_MATTER = re.compile(r"\A---\n(.*?\n)---\n", re.DOTALL)


class ModelCardError(ValueError):
    """A template, card or evaluation JSON that cannot be used, with the reason."""


# --------------------------------------------------------------------------------------------
# Evaluation JSON
# --------------------------------------------------------------------------------------------


def load_metrics(metrics_json: str | os.PathLike | Mapping) -> dict[str, Any]:
    """Read and validate an evaluation JSON (a path or an already loaded mapping).

    Every metric of :data:`METRICS` must be a finite number and `num_images` a positive integer; `protocol`, if
    present, must be a mapping. Raises `ModelCardError` naming what is wrong.
    """
    if isinstance(metrics_json, Mapping):
        data, origin = dict(metrics_json), "metrics"
    else:
        origin = str(metrics_json)
        try:
            data = json.loads(Path(metrics_json).read_text())
        except FileNotFoundError:
            raise ModelCardError(f"evaluation JSON {origin} does not exist") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
            raise ModelCardError(f"evaluation JSON {origin} cannot be read: {error}") from None
        if not isinstance(data, dict):
            raise ModelCardError(f"evaluation JSON {origin} must hold an object, got {type(data).__name__}")
    missing = [key for key in (*METRICS, "num_images") if key not in data]
    if missing:
        raise ModelCardError(f"evaluation JSON {origin} lacks {missing}")
    for key in METRICS:
        value = data[key]
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ModelCardError(f"evaluation JSON {origin}: {key} must be a finite number, got {value!r}")
    num_images = data["num_images"]
    if isinstance(num_images, bool) or not isinstance(num_images, int) or num_images <= 0:
        raise ModelCardError(f"evaluation JSON {origin}: num_images must be a positive integer, got {num_images!r}")
    protocol = data.get("protocol", {})
    if not isinstance(protocol, Mapping):
        raise ModelCardError(f"evaluation JSON {origin}: protocol must be an object, got {type(protocol).__name__}")
    data["protocol"] = dict(protocol)
    uncertainty = data.get("uncertainty")
    if uncertainty is not None:
        areas = [uncertainty.get(key) for key in ("ause", "ause_random")] if isinstance(uncertainty, Mapping) else []
        if len(areas) != 2 or not all(isinstance(a, Mapping) and a and all(_finite(v) for v in a.values()) for a in areas):
            raise ModelCardError(
                f"evaluation JSON {origin}: uncertainty must hold 'ause' and 'ause_random' objects of finite numbers "
                "(as examples/evaluate.py --uncertainty writes them)"
            )
    return data


def _finite(value) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def _dataset_fields(metrics: Mapping[str, Any]) -> dict[str, str]:
    protocol = metrics["protocol"]
    name = "NYU Depth V2 (Eigen test split)"
    if metrics["num_images"] != EIGEN_TEST_FRAMES:
        name = f"NYU Depth V2 (Eigen test split, {metrics['num_images']} of {EIGEN_TEST_FRAMES} frames)"
    return {
        "dataset_type": str(protocol.get("dataset_id", "sayakpaul/nyu_depth_v2")),
        "dataset_name": str(protocol.get("dataset", name)),
        "dataset_split": str(protocol.get("split", "test")),
    }


def _eval_results(metrics: Mapping[str, Any]) -> list[EvalResult]:
    dataset = _dataset_fields(metrics)
    return [
        EvalResult(
            task_type="depth-estimation",
            task_name="Monocular Depth Estimation",
            metric_type=key,
            metric_name=name,
            metric_value=float(metrics[key]),
            **dataset,
        )
        for key, (name, _) in METRICS.items()
    ]


def results_section(metrics: Mapping[str, Any] | None) -> str:
    """The markdown of the card's own results: a table from `metrics`, or the no-evaluation notice."""
    if metrics is None:
        return NO_EVALUATION
    header = " | ".join(f"{name} {'↑' if up else '↓'}" for name, up in METRICS.values())
    values = " | ".join(f"{float(metrics[key]):.4f}" for key in METRICS)
    lines = [
        "Results of **this checkpoint**, generated from its evaluation output:",
        "",
        f"| {header} |",
        "| " + " | ".join("---:" for _ in METRICS) + " |",
        f"| {values} |",
        "",
        f"Images evaluated: **{metrics['num_images']}**.",
    ]
    if metrics["num_images"] != EIGEN_TEST_FRAMES:
        lines.append(
            f"This is not the full {EIGEN_TEST_FRAMES}-frame Eigen test split, so the numbers are not directly "
            "comparable with published NYU results."
        )
    uncertainty = metrics.get("uncertainty")
    if uncertainty:
        names = {"abs_rel": "AbsRel", "rmse": "RMSE"}
        lines += [
            "",
            "Per-pixel uncertainty (standard deviation of the depth-bin distribution), sparsification AUSE on the "
            "same images (lower is better; the random order is the level of an uninformative uncertainty):",
            "",
            "| metric | AUSE ↓ | AUSE of a random order |",
            "| :--- | ---: | ---: |",
        ]
        lines += [
            f"| {names.get(key, key)} | {float(value):.4f} | {float(uncertainty['ause_random'][key]):.4f} |"
            for key, value in uncertainty["ause"].items()
        ]
    protocol = metrics["protocol"]
    if protocol:
        lines += ["", "Evaluation protocol, as recorded by the evaluation:", ""]
        lines += [f"- `{key}`: {_protocol_value(value)}" for key, value in protocol.items()]
    return "\n".join(lines)


def _protocol_value(value: Any) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    return f"`{text}`" if "`" not in text else text


# --------------------------------------------------------------------------------------------
# Card rendering
# --------------------------------------------------------------------------------------------


def _split_front_matter(text: str, origin: str) -> tuple[dict, str]:
    match = _FRONT_MATTER.match(text)
    if not match:
        raise ModelCardError(f"{origin} does not start with a '---' YAML metadata block")
    try:
        metadata = yaml.safe_load(match.group(1)) or {}
    except yaml.YAMLError as error:
        raise ModelCardError(f"{origin} has unparseable YAML metadata: {error}") from None
    if not isinstance(metadata, dict):
        raise ModelCardError(f"{origin}: the YAML metadata block must be a mapping")
    return metadata, text[match.end():]


def _join(metadata: dict, body: str, metrics: Mapping[str, Any] | None, model_name: str) -> str:
    metadata = {k: v for k, v in metadata.items() if k != "model-index"}
    data = ModelCardData(**metadata)
    if metrics is not None:
        data.model_name = model_name
        data.eval_results = _eval_results(metrics)
    return f"---\n{data.to_yaml()}\n---\n{body}"


def render_model_card(
    template: str | os.PathLike | None = None,
    metrics_json: str | os.PathLike | Mapping | None = None,
    *,
    config,
    model_name: str,
    model_id: str | None = None,
    base_model: str | None = None,
    checkpoint_status: str | None = None,
    details: Mapping[str, Any] | None = None,
) -> str:
    """The model card (README.md text) of a checkpoint.

    Args:
        template: the template file; `MODEL_CARD.md` at the repository root by default.
        metrics_json: the evaluation JSON (path or mapping) of this checkpoint, or None for "no evaluation yet".
        config: the checkpoint's `MoADepthCLIPConfig`: the depth range the card states comes from it.
        model_name: the card's title and the `model-index` name.
        model_id: Hub id or path shown in the usage examples (defaults to `model_name`).
        base_model: Hub id of the CLIP checkpoint the weights come from, when known (`base_model` metadata).
        checkpoint_status: a paragraph saying what this checkpoint is (converted/untrained, trained, ...).
        details: rows of the "Checkpoint" table (name -> value), e.g. from :func:`config_details`.
    """
    template_path = Path(template) if template is not None else DEFAULT_TEMPLATE
    try:
        text = template_path.read_text()
    except OSError as error:
        raise ModelCardError(f"cannot read the model card template {template_path}: {error}") from None
    metadata, body = _split_front_matter(text, str(template_path))
    metrics = load_metrics(metrics_json) if metrics_json is not None else None
    if base_model:
        metadata["base_model"] = base_model
    fields = {
        "model_name": model_name,
        "model_id": model_id or model_name,
        "checkpoint_status": checkpoint_status
        or "This card describes a MoA-DepthCLIP checkpoint; see *Checkpoint* below for its configuration.",
        "checkpoint_details": _details_table(details or {}),
        "results": results_section(metrics),
        "min_depth": f"{config.min_depth:g}",
        "max_depth": f"{config.max_depth:g}",
    }
    used = set(_PLACEHOLDER.findall(body))
    unknown = sorted(used - set(fields))
    if unknown:
        raise ModelCardError(f"template {template_path} uses unknown fields {unknown}; known: {sorted(fields)}")
    absent = sorted({"results"} - used)
    if absent or body.count(RESULTS_START) != 1 or body.count(RESULTS_END) != 1:
        raise ModelCardError(
            f"template {template_path} must hold {{{{ results }}}} once, between {RESULTS_START} and {RESULTS_END}"
        )
    body = _PLACEHOLDER.sub(lambda m: str(fields[m.group(1)]), _TEMPLATE_NOTE.sub("", body, count=1))
    return _join(metadata, body, metrics, model_name)


def update_model_card_results(
    card_text: str, metrics_json: str | os.PathLike | Mapping | None, *, model_name: str
) -> str:
    """Replace the results section and the `model-index` of an existing card, keeping everything else."""
    metadata, body = _split_front_matter(card_text, "model card")
    start, end = body.find(RESULTS_START), body.find(RESULTS_END)
    if start < 0 or end < start or body.count(RESULTS_START) != 1:
        raise ModelCardError(
            f"the model card has no results section between {RESULTS_START} and {RESULTS_END}; "
            "render it from MODEL_CARD.md instead"
        )
    metrics = load_metrics(metrics_json) if metrics_json is not None else None
    body = body[: start + len(RESULTS_START)] + "\n" + results_section(metrics) + "\n" + body[end:]
    return _join(metadata, body, metrics, model_name)


def _details_table(details: Mapping[str, Any]) -> str:
    if not details:
        return "See `config.json` for the configuration."
    lines = ["| | |", "| :--- | :--- |"]
    for key, value in details.items():
        text = str(value).replace("|", "\\|").replace("\n", " ")
        lines.append(f"| {key} | {text} |")
    return "\n".join(lines)


def config_details(config, image_size: tuple[int, int] | None = None) -> dict[str, str]:
    """The "Checkpoint" table rows that describe a `MoADepthCLIPConfig` or a `DepthCLIPConfig`."""
    vision = config.vision_config
    rows = {
        "backbone": (
            f"CLIP ViT, {vision.num_hidden_layers} blocks, width {vision.hidden_size}, patch {vision.patch_size}, "
            f"pretraining size {vision.image_size}"
        ),
    }
    if isinstance(config, DepthCLIPConfig):
        rows["trainable CLIP blocks"] = "none"
        depths = ", ".join(f"{d:g}" for d in config.bin_depths)
        rows["depth head"] = (
            f"DepthCLIP zero-shot on the patch grid: softmax over the prompts of "
            f"{config.logit_scale:g}·cos / {config.prompt_temperature:g}, expected depth of "
            f"({depths}) m, bilinear upsampling; no adapters, nothing trained"
        )
    else:
        rows["trainable CLIP blocks"] = ", ".join(map(str, config.trainable_layer_indices)) or "none"
        rows["MoA after blocks"] = ", ".join(map(str, config.moa_layers))
        rows["experts per MoA"] = (
            f"{config.num_experts} × Linear({vision.hidden_size}→{config.adapter_bottleneck}) → GELU "
            f"→ Linear({config.adapter_bottleneck}→{vision.hidden_size}), router {config.router_type}"
            + ("" if config.prompt_guided_router else ", without the semantic context")
        )
        rows["decoder"] = config.decoder
        bins = f"{config.num_depth_bins} {config.bin_spacing}-spaced bins"
        branches = {"hybrid": f"{bins} + regression", "classification": bins, "regression": "direct regression"}
        rows["depth head"] = f"{branches[config.head]}, {config.min_depth:g}–{config.max_depth:g} m"
    rows["depth prompts"] = "; ".join(f'"{p}"' for p in config.depth_prompts)
    if image_size is not None:
        rows["input size"] = f"{image_size[0]}×{image_size[1]} (image processor)"
    return rows
