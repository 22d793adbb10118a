"""The `depth-estimation` pipeline, extended with metric depth as NumPy and a colour-mapped depth image."""

import os

import numpy as np
from transformers import DepthEstimationPipeline

from .configuration_moa_depthclip import MoADepthCLIPConfig
from .image_processing_moa_depthclip import load_image_file
from .visualization import colorize_unit_depth, grayscale_unit_depth, normalize_depth


class MoADepthCLIPDepthEstimationPipeline(DepthEstimationPipeline):
    """`DepthEstimationPipeline` with richer, safer outputs; behaves like the stock pipeline otherwise.

    Each result holds:
    - `predicted_depth`: `torch.Tensor` `(height, width)` at the input image's size (metres for MoA-DepthCLIP);
    - `metric_depth`: the same as a float32 NumPy array;
    - `depth`: 8-bit greyscale `PIL.Image` (a constant map gives black instead of dividing by zero);
    - `colored_depth`: RGB `PIL.Image`, Turbo colour map, near is red.

    Local image paths are opened with `load_image_file`, so an unreadable file fails with one error naming it.
    The model runs as it was handed over (nothing is installed on it).
    """

    # depth models have no video processor; left unset, the loader would probe for one and ask about remote code
    _load_video_processor = False

    def preprocess(self, image, timeout=None):
        if isinstance(image, (str, os.PathLike)) and not str(image).startswith(("http://", "https://", "data:")):
            image = load_image_file(image)
        return super().preprocess(image, timeout=timeout)

    def postprocess(self, model_outputs):
        outputs = self.image_processor.post_process_depth_estimation(model_outputs, [model_outputs["target_size"]])
        formatted = []
        for output in outputs:
            depth = output["predicted_depth"].detach().float().cpu()
            array = depth.numpy().astype(np.float32)
            unit = normalize_depth(array)
            formatted.append(
                {
                    "predicted_depth": depth,
                    "metric_depth": array,
                    "depth": grayscale_unit_depth(unit),
                    "colored_depth": colorize_unit_depth(unit),
                }
            )
        return formatted[0] if len(formatted) == 1 else formatted


def depth_estimation_pipeline_for(stock_class):
    """The class `pipeline("depth-estimation")` builds once this package is imported: MoA-DepthCLIP models get
    `MoADepthCLIPDepthEstimationPipeline`, every other model gets exactly what `stock_class` builds."""

    class DepthEstimationPipelineByModel(stock_class):
        # no depth-estimation pipeline uses a video processor; probing a MoA-DepthCLIP folder for one would ask
        # about remote code (its image processor's auto_map suggests a video processor next to it)
        _load_video_processor = False

        def __new__(cls, *args, **kwargs):
            model = kwargs.get("model", args[0] if args else None)
            model_type = getattr(getattr(model, "config", None), "model_type", None)
            target = MoADepthCLIPDepthEstimationPipeline if model_type == MoADepthCLIPConfig.model_type else stock_class
            # an instance of another class: Python does not run __init__ on it a second time
            return target(*args, **kwargs)

    DepthEstimationPipelineByModel.__qualname__ = DepthEstimationPipelineByModel.__name__
    return DepthEstimationPipelineByModel


__all__ = ["MoADepthCLIPDepthEstimationPipeline"]
