"""The `depth-estimation` pipeline, extended with metric depth as NumPy and a colour-mapped depth image."""

import os

import numpy as np
from transformers import DepthEstimationPipeline

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

    Reach it with `pipeline("depth-estimation", model=..., pipeline_class=MoADepthCLIPDepthEstimationPipeline)`, or
    from a saved folder's own code with `pipeline("depth-estimation", model=folder, trust_remote_code=True)`. The
    model it is given is run as it is: the pipeline changes none of its modules or weights.
    """

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


__all__ = ["MoADepthCLIPDepthEstimationPipeline"]
