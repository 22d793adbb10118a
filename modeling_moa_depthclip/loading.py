"""The one loader of saved models of this package (MoA-DepthCLIP and its DepthCLIP zero-shot baseline): a local
folder or Hub id is checked before any weight is read, and every failure is one `ModelLoadError` line naming the
folder or file and the reason. The models' own `from_pretrained` runs the same folder checks."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoImageProcessor, AutoModelForDepthEstimation
from transformers.models.auto.modeling_auto import MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES

# The modeling modules import this one (their `from_pretrained` runs its checks): it must not import them.
from .configuration_depthclip import DepthCLIPConfig
from .configuration_moa_depthclip import MoADepthCLIPConfig
from .image_processing_moa_depthclip import MoADepthCLIPImageProcessor
from .utils import first_line, is_hub_id


logger = logging.getLogger(__name__)

# The model types this package loads, each with its own config class (registered with the auto classes)
CONFIG_CLASSES = (MoADepthCLIPConfig, DepthCLIPConfig)
MODEL_TYPES = tuple(config_class.model_type for config_class in CONFIG_CLASSES)
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"


class ModelLoadError(OSError, ValueError):
    """A model that cannot be loaded; the message is one line naming the folder or file and the reason."""


class WeightsFileError(ModelLoadError):
    """A weights file that is missing, truncated or not safetensors."""


def _local_folder(model_id: str | os.PathLike) -> Path | None:
    """The local folder `model_id` names, or None for a Hub id; a missing folder or a file is a `ModelLoadError`."""
    text = os.fspath(model_id)
    path = Path(text).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelLoadError(f"model {path} is a file, not a model folder (save_pretrained writes a folder)")
        return path
    if is_hub_id(text):
        return None
    raise ModelLoadError(f"model folder {path} does not exist")


def check_safetensors(path: Path):
    """A weights file whose header or data end before it should (an interrupted copy or save) is named here,
    where safetensors itself would raise an error that names no file."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise WeightsFileError(f"{path}: cannot read the weights: the file is empty or truncated ({size} bytes)")
        header_size = int.from_bytes(prefix, "little")
        if header_size > size - 8:
            raise WeightsFileError(
                f"{path}: cannot read the weights: the file is truncated or not safetensors (its header claims "
                f"{header_size:,} bytes, the file has {size:,})"
            )
        try:
            header = json.loads(handle.read(header_size))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise WeightsFileError(f"{path}: cannot read the weights: not a safetensors file (unreadable header)") from None
    try:
        end = max((entry["data_offsets"][1] for key, entry in header.items() if key != "__metadata__"), default=0)
    except (TypeError, KeyError, IndexError):
        raise WeightsFileError(f"{path}: cannot read the weights: not a safetensors file (malformed header)") from None
    expected = 8 + header_size + int(end)
    if size < expected:
        raise WeightsFileError(
            f"{path}: cannot read the weights: the file is truncated ({size:,} of {expected:,} bytes; an interrupted "
            "save or copy?)"
        )


def check_weights(folder: Path):
    """Every weights file a saved folder needs is there and complete (`WeightsFileError` naming the file)."""
    index = folder / WEIGHTS_INDEX_NAME
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError):
            raise WeightsFileError(f"{index} is not a valid safetensors index (no weight_map)") from None
        for shard in shards:
            if not (folder / shard).is_file():
                raise WeightsFileError(f"model folder {folder} lacks the weights file {shard} listed in {index.name}")
            check_safetensors(folder / shard)
        return
    weights = folder / WEIGHTS_NAME
    if weights.is_file():
        check_safetensors(weights)
    elif not any((folder / name).is_file() for name in ("pytorch_model.bin", "pytorch_model.bin.index.json")):
        raise WeightsFileError(f"model folder {folder} has no {WEIGHTS_NAME}: no weights saved")


def check_model_folder(folder: Path, model_types: tuple[str, ...] = MODEL_TYPES) -> None:
    """A saved model folder has a readable `config.json` of one of `model_types` (a `ModelLoadError` naming
    config.json otherwise)."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ModelLoadError(f"model folder {folder} has no config.json: not a saved model")
    try:
        settings = json.loads(config_file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ModelLoadError(f"{config_file} is not valid JSON: {error}") from None
    model_type = settings.get("model_type") if isinstance(settings, dict) else None
    if model_type is None:
        raise ModelLoadError(f"{config_file} has no model_type: not a transformers model config")
    if model_type not in model_types:
        raise ModelLoadError(_other_type_message(str(folder), model_type, model_types))


def load_config(model_id: str | os.PathLike):
    """The config (`MoADepthCLIPConfig` or `DepthCLIPConfig`) of a saved model (local folder or Hub id), checked
    before any weight is read.

    Raises `ModelLoadError` (one line naming the folder or file) for a missing folder, a folder without
    `config.json`, an unreadable `config.json`, or a model of another type.
    """
    folder = _local_folder(model_id)
    if folder is not None:
        check_model_folder(folder)
    try:
        config = AutoConfig.from_pretrained(os.fspath(folder or model_id))
    except (OSError, ValueError, KeyError, TypeError) as error:
        if folder is not None:
            raise ModelLoadError(f"cannot load {folder / 'config.json'}: {first_line(error)}") from None
        raise ModelLoadError(
            f"model {os.fspath(model_id)!r} is not a local folder and cannot be loaded from the Hub: {first_line(error)}"
        ) from None
    if not isinstance(config, CONFIG_CLASSES):
        raise ModelLoadError(_other_type_message(os.fspath(model_id), config.model_type, MODEL_TYPES))
    return config


def _other_type_message(where: str, model_type: str, model_types: tuple[str, ...]) -> str:
    depth_model = model_type in MODEL_FOR_DEPTH_ESTIMATION_MAPPING_NAMES or model_type in MODEL_TYPES
    kind = "a depth model of another type" if depth_model else "not a depth model"
    expected = " or ".join(repr(name) for name in model_types)
    return f"model {where} is a {model_type!r} model ({kind}), not one of this package's (model_type {expected})"


def load_model_and_processor(
    model_id: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    trainable: bool = False,
):
    """Load a saved model of this package (local folder or Hub id: MoA-DepthCLIP or the DepthCLIP zero-shot
    baseline, the class its config names) and its image processor.

    The model comes back in eval mode (in train mode with `trainable=True`, the paper's parameters unfrozen), moved
    to `device`/`dtype` if given. A folder without `preprocessor_config.json` gets the default image processor at
    the config's image size, with a warning.

    Raises:
        ModelLoadError: (an `OSError` and a `ValueError`) one line naming the folder or file and the reason: missing
            folder, no `config.json`, a model of another type, missing or truncated `model.safetensors`, weights that
            do not fit the config.
    """
    config = load_config(model_id)
    folder = _local_folder(model_id)
    source = os.fspath(folder) if folder is not None else os.fspath(model_id)
    if folder is not None:
        check_weights(folder)
    try:
        # mismatched shapes are reported below, naming the tensors, instead of transformers' pointer to its log
        model, info = AutoModelForDepthEstimation.from_pretrained(
            source, config=config, output_loading_info=True, ignore_mismatched_sizes=True
        )
    except (OSError, ValueError, KeyError, RuntimeError, SafetensorError) as error:
        raise ModelLoadError(f"cannot load the weights of model {source}: {first_line(error)}") from None
    mismatched = info.get("mismatched_keys") or []
    if mismatched:
        key, *shapes = sorted(mismatched)[0]
        detail = f" ({key}: file {tuple(shapes[0])} vs config {tuple(shapes[1])})" if len(shapes) == 2 else f" ({key})"
        raise ModelLoadError(
            f"the weights of model {source} do not fit its config.json: {len(mismatched)} tensor(s) of another "
            f"shape{detail}"
        )
    # from_pretrained only warns about weights missing from the file and initialises them randomly: refuse
    missing = sorted(info.get("missing_keys") or [])
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        raise ModelLoadError(
            f"the weights of model {source} lack {len(missing)} tensor(s) of its config ({', '.join(missing[:3])}{more}): "
            "not a checkpoint of this model"
        )
    try:
        image_processor = AutoImageProcessor.from_pretrained(source)
    except (OSError, ValueError, KeyError):
        image_processor = default_image_processor(config)
        size = image_processor.size
        logger.warning(f"{source} has no image processor; using a default one at {size['height']}x{size['width']}")
    if device is not None or dtype is not None:
        model.to(device=device, dtype=dtype)
    if trainable:
        model.train()
        model.apply_trainable_mask()
    else:
        model.eval()
    return model, image_processor


def default_image_processor(config, image_size: tuple[int, int] | None = None) -> MoADepthCLIPImageProcessor:
    """The image processor a model of `config` is trained and evaluated with: `image_size` (height, width; default
    the vision tower's input size), sizes kept to multiples of its patch size."""
    height, width = image_size if image_size is not None else (config.vision_config.image_size,) * 2
    return MoADepthCLIPImageProcessor(
        size={"height": int(height), "width": int(width)}, size_divisor=config.vision_config.patch_size
    )


__all__ = [
    "CONFIG_CLASSES",
    "MODEL_TYPES",
    "ModelLoadError",
    "WeightsFileError",
    "check_model_folder",
    "check_safetensors",
    "check_weights",
    "default_image_processor",
    "load_config",
    "load_model_and_processor",
]
