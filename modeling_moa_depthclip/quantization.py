"""Inference precisions offered to users (float32, bfloat16, float16, int8): one list for every entry point.

int8 is onnxruntime's dynamic int8 quantisation of the model's ONNX export (`onnx_export.quantize_onnx_int8`:
int8 weights per output channel, activations quantised on each call, no calibration data), the fastest of the
maintained routes `benchmarks/run.py` measured on CPU (against torchao's int8, bf16, inductor and onnxruntime fp32;
BENCHMARKS.md has the figures and the depth difference from fp32 on real frames).

`load_depth_pipeline(model, dtype="int8")` loads the model, exports and quantises it once, caches the `.onnx` file
under a key of the weights' content (`~/.cache/moa_depthclip/onnx`, or `$MOA_DEPTHCLIP_CACHE`), and returns the
usual depth pipeline whose forward runs that file in onnxruntime: the same preprocessing, postprocessing and
outputs. A model object a caller holds is never changed. This is a tooling module: the model core does not import it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import torch

from .modeling_moa_depthclip import MoADepthCLIPDepthEstimatorOutput
from .packed_linear import pack_linear_layers
from .pipeline_moa_depthclip import MoADepthCLIPDepthEstimationPipeline


INFERENCE_DTYPES = ("float32", "bfloat16", "float16", "int8")
CACHE_ENV = "MOA_DEPTHCLIP_CACHE"

logger = logging.getLogger(__name__)


class QuantizationUnavailableError(RuntimeError):
    """int8 was asked for but onnx/onnxruntime, which provide it, are not installed."""


def torch_dtype_for(dtype: str | None):
    """The torch dtype the weights are loaded in for one of `INFERENCE_DTYPES` (int8 starts from fp32)."""
    if dtype is None:
        return None
    if dtype not in INFERENCE_DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(INFERENCE_DTYPES)}, got {dtype!r}")
    return torch.float32 if dtype == "int8" else getattr(torch, dtype)


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "moa_depthclip") / "onnx"


def _content_key(model, processor) -> str:
    """Digest of everything the exported graph depends on: weights, config, input size, library versions."""
    import onnxruntime

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    digest.update(model.config.to_json_string().encode())
    digest.update(json.dumps(processor.size, sort_keys=True).encode())
    digest.update(f"{torch.__version__} {onnxruntime.__version__}".encode())
    return digest.hexdigest()[:32]


def int8_onnx_file(model, processor, cache_dir=None) -> Path:
    """The int8 ONNX file of `model` (fp32, unchanged), exported and quantised on first use, then read from the
    cache."""
    from .onnx_export import export_onnx

    path = Path(cache_dir or default_cache_dir()) / f"{_content_key(model, processor)}-int8.onnx"
    if not path.is_file():
        logger.warning("exporting the model to ONNX and quantising it to int8, once (cached at %s)", path)
        export_onnx(model, processor, path, quantize="int8")
    return path


class OnnxRuntimeDepthEstimationPipeline(MoADepthCLIPDepthEstimationPipeline):
    """The depth pipeline with its forward run by an onnxruntime session (the same inputs and outputs).

    `model` is kept for its config and image processor; the session computes `predicted_depth`.
    """

    def __init__(self, *args, session, **kwargs):
        super().__init__(*args, **kwargs)
        self.session = session
        self.input_name = session.get_inputs()[0].name
        self.output_names = [output.name for output in session.get_outputs()]

    def _forward(self, model_inputs):
        target_size = model_inputs.pop("target_size")
        pixel_values = model_inputs["pixel_values"].detach().to("cpu", torch.float32).numpy()
        found = self.session.run(self.output_names, {self.input_name: np.ascontiguousarray(pixel_values)})
        # the graph's outputs are named after the model output's fields (predicted_depth[, depth_uncertainty])
        outputs = MoADepthCLIPDepthEstimatorOutput(
            **{name: torch.from_numpy(values) for name, values in zip(self.output_names, found)}
        )
        outputs["target_size"] = target_size
        return outputs


def onnxruntime_session(path, intra_op_num_threads: int | None = None):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = intra_op_num_threads or torch.get_num_threads()
    # idle onnxruntime threads would otherwise busy-wait after each run, taking the cores from whatever runs next
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return onnxruntime.InferenceSession(os.fspath(path), options, providers=["CPUExecutionProvider"])


def load_depth_pipeline(model, dtype: str | None = None, device=None, cache_dir=None):
    """The MoA-DepthCLIP depth pipeline for a folder or Hub id in `dtype`, one of `INFERENCE_DTYPES` (None: as
    saved). int8 runs on CPU in onnxruntime (see the module docstring); the others in PyTorch on `device`.

    Raises `loading.ModelLoadError` for a model that cannot be loaded, `ValueError` for a bad dtype or an int8
    request on another device, `QuantizationUnavailableError` without onnx/onnxruntime.
    """
    from .loading import load_model_and_processor

    torch_dtype = torch_dtype_for(dtype)
    if device is None:
        device = "cuda" if torch.cuda.is_available() and dtype != "int8" else "cpu"
    if dtype == "int8" and torch.device(device).type != "cpu":
        raise ValueError(f"int8 runs on the CPU (onnxruntime); got device {device!r}")
    if dtype == "int8":
        try:
            import onnx  # noqa: F401
            import onnxruntime  # noqa: F401
            import onnxscript  # noqa: F401
        except ImportError as error:
            raise QuantizationUnavailableError(
                f"int8 needs onnx, onnxscript and onnxruntime ({error}); install them with "
                "`pip install 'moa-depthclip[onnx]'`"
            ) from None
    loaded, processor = load_model_and_processor(model, dtype=torch_dtype)
    if dtype != "int8":
        if torch.device(device).type == "cpu" and next(loaded.parameters()).dtype == torch.float32:
            # the CPU fast path in fp32 (BENCHMARKS.md section 7), on the model loaded here: nobody else holds it
            pack_linear_layers(loaded)
        return MoADepthCLIPDepthEstimationPipeline(model=loaded, image_processor=processor, device=device)
    session = onnxruntime_session(int8_onnx_file(loaded, processor, cache_dir))
    return OnnxRuntimeDepthEstimationPipeline(model=loaded, image_processor=processor, device=device, session=session)


__all__ = [
    "INFERENCE_DTYPES",
    "OnnxRuntimeDepthEstimationPipeline",
    "QuantizationUnavailableError",
    "int8_onnx_file",
    "load_depth_pipeline",
    "torch_dtype_for",
]
