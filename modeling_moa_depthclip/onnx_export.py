"""ONNX export of MoA-DepthCLIP (`pixel_values -> predicted_depth[, depth_uncertainty]`), optionally with onnxruntime's dynamic int8
quantisation. Used by `python -m conversion.export_onnx` and by the int8 inference path (`quantization.py`).

A tooling module: it needs the `onnx` extra (onnx, onnxscript, onnxruntime) and the model core never imports it.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

from .uncertainty import has_depth_bins


DEFAULT_OPSET = 18
QUANTIZATIONS = ("int8",)
# where the image processor's settings go in the file's metadata; `conversion/onnx_inference.py` (torch-free, so it
# cannot import this package) reads the same key, which a test holds equal
PREPROCESSING_METADATA_KEY = "moa_depthclip.preprocessing"


def output_names(model) -> list[str]:
    """The exported graph's outputs: the depth, and its uncertainty where the model has depth bins."""
    return ["predicted_depth", "depth_uncertainty"] if has_depth_bins(model.config) else ["predicted_depth"]


def _depth_only(model):
    import torch

    names = output_names(model)

    class DepthOnly(torch.nn.Module):
        """`pixel_values -> predicted_depth[, depth_uncertainty]`: the graph ONNX gets, without the training-only
        outputs."""

        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, pixel_values):
            outputs = self.model(pixel_values=pixel_values, return_dict=True)
            return tuple(outputs[name] for name in names)

    return DepthOnly(model).eval()


def preprocessing_settings(processor) -> dict:
    return {
        "do_resize": bool(processor.do_resize),
        "size": dict(processor.size),
        "resample": processor.resample,
        "do_normalize": bool(processor.do_normalize),
        "image_mean": [float(v) for v in processor.image_mean],
        "image_std": [float(v) for v in processor.image_std],
    }


def quantize_onnx_int8(source, output) -> Path:
    """onnxruntime's dynamic int8 quantisation of the fp32 graph at `source`, written to `output` (metadata kept).

    Weights of MatMul/Gemm become int8 per output channel; activations are quantised per call, so no calibration
    data is needed. Written beside `output`, then moved, like the fp32 export.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    output = Path(output)
    handle, partial = tempfile.mkstemp(suffix=".onnx", dir=output.parent)
    os.close(handle)
    # onnxruntime advises shape-inference pre-processing on the root logger; the dynamo export carries its shapes
    advice = _DropMessage("consider to run pre-processing before quantization")
    logging.getLogger().addFilter(advice)
    try:
        quantize_dynamic(
            os.fspath(source), partial, weight_type=QuantType.QInt8, per_channel=True,
            op_types_to_quantize=["MatMul", "Gemm"], nodes_to_exclude=_vector_products(source),
        )
        # quantize_dynamic keeps the graph but not always the model's metadata: copy the preprocessing settings over
        quantized, original = onnx.load(partial), onnx.load(os.fspath(source), load_external_data=False)
        present = {entry.key for entry in quantized.metadata_props}
        for entry in original.metadata_props:
            if entry.key not in present:
                quantized.metadata_props.add(key=entry.key, value=entry.value)
        onnx.save(quantized, partial)
        onnx.checker.check_model(partial, full_check=True)
        os.replace(partial, output)
    finally:
        logging.getLogger().removeFilter(advice)
        if os.path.exists(partial):
            os.remove(partial)
    return output


def _vector_products(path) -> list[str]:
    """MatMul nodes whose second input is a constant vector (the weighted sums over the depth bins): no weight
    matrix to quantise, and onnxruntime's per-channel int8 MatMul cannot take a 1-D one."""
    import onnx

    graph = onnx.load(os.fspath(path), load_external_data=False).graph
    vectors = {tensor.name for tensor in graph.initializer if len(tensor.dims) < 2}
    return [node.name for node in graph.node if node.op_type == "MatMul" and node.input[1] in vectors]


class _DropMessage(logging.Filter):
    def __init__(self, text: str):
        super().__init__()
        self.text = text

    def filter(self, record):
        return self.text not in record.getMessage()


def export_onnx(model, processor, output, opset: int = DEFAULT_OPSET, quantize: str | None = None) -> Path:
    """Write `model` as ONNX to `output` (dynamic batch, fixed processor size) and run `onnx.checker` on it;
    `quantize="int8"` writes onnxruntime's dynamic int8 quantisation of that graph instead."""
    import onnx
    import torch

    if quantize not in (None, *QUANTIZATIONS):
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZATIONS)}, got {quantize!r}")
    if quantize is not None:
        Path(output).parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=Path(output).parent) as scratch:
            fp32 = export_onnx(model, processor, Path(scratch) / "float32.onnx", opset=opset)
            return quantize_onnx_int8(fp32, output)

    output = Path(output)
    height, width = processor.size["height"], processor.size["width"]
    channels = model.config.vision_config.num_channels
    example = torch.randn(2, channels, height, width, generator=torch.Generator().manual_seed(0))
    program = torch.onnx.export(
        _depth_only(model),
        (example,),
        dynamo=True,
        opset_version=opset,
        input_names=["pixel_values"],
        output_names=output_names(model),
        dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch", min=1)}},
        verbose=False,
    )
    program.model.metadata_props[PREPROCESSING_METADATA_KEY] = json.dumps(preprocessing_settings(processor))
    output.parent.mkdir(parents=True, exist_ok=True)
    # write beside the destination, then move: a failed export never leaves a half-written file
    handle, partial = tempfile.mkstemp(suffix=".onnx", dir=output.parent)
    os.close(handle)
    try:
        program.save(partial)
        onnx.checker.check_model(partial, full_check=True)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)
    return output


__all__ = [
    "DEFAULT_OPSET",
    "PREPROCESSING_METADATA_KEY",
    "QUANTIZATIONS",
    "export_onnx",
    "output_names",
    "preprocessing_settings",
    "quantize_onnx_int8",
]
