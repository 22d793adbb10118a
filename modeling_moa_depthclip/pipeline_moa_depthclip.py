"""The `depth-estimation` pipeline, extended with metric depth as NumPy and a colour-mapped depth image."""

import numpy as np
from transformers import DepthEstimationPipeline

from .image_processing_moa_depthclip import to_float_rgb
from .visualization import colorize_uncertainty, colorize_unit_depth, grayscale_unit_depth, normalize_depth


class MoADepthCLIPDepthEstimationPipeline(DepthEstimationPipeline):
    """`DepthEstimationPipeline` with richer, safer outputs; behaves like the stock pipeline otherwise.

    Each result holds:
    - `predicted_depth`: `torch.Tensor` `(height, width)` at the input image's size (metres for MoA-DepthCLIP);
    - `metric_depth`: the same as a float32 NumPy array;
    - `depth`: 8-bit greyscale `PIL.Image` (a constant map gives black instead of dividing by zero);
    - `colored_depth`: RGB `PIL.Image`, Turbo colour map, near is red;
    - for a model with depth bins (every head but `"regression"`): `uncertainty`, the standard deviation of the
      per-pixel bin distribution in metres as a float32 NumPy array at the image's size, and `colored_uncertainty`,
      an RGB `PIL.Image` of it (Turbo from 0 m, blue, to its largest value, red).

    Images are read by the image processor's rule (`to_float_rgb`), not by transformers' `load_image`, whose
    conversion to 8-bit RGB clips 16-bit pictures and drops alpha: paths (an unreadable file fails with one error
    naming it), URLs, PIL images of any mode, NumPy arrays and tensors give the depth the processor gives.

    Reach it with `pipeline("depth-estimation", model=..., pipeline_class=MoADepthCLIPDepthEstimationPipeline)`, or
    from a saved folder's own code with `pipeline("depth-estimation", model=folder, trust_remote_code=True)`. The
    model it is given is run as it is: the pipeline changes none of its modules or weights.
    """

    # Depth estimation needs no video processor. transformers' pipeline factory reads this flag of the class it builds
    # (as it reads the `_load_image_processor` that DepthEstimationPipeline sets): left unset, it probes a saved folder
    # for a video processor and, finding the image processor's `auto_map`, asks whether to run remote code.
    _load_video_processor = False

    def preprocess(self, image, timeout=None):
        rgb = to_float_rgb(image, timeout=timeout)
        model_inputs = self.image_processor(images=rgb, return_tensors="pt").to(self.dtype)
        model_inputs["target_size"] = rgb.shape[:2]
        return model_inputs

    def postprocess(self, model_outputs):
        outputs = self.image_processor.post_process_depth_estimation(model_outputs, [model_outputs["target_size"]])
        formatted = []
        for output in outputs:
            depth = output["predicted_depth"].detach().float().cpu()
            array = depth.numpy().astype(np.float32)
            unit = normalize_depth(array)
            result = {
                "predicted_depth": depth,
                "metric_depth": array,
                "depth": grayscale_unit_depth(unit),
                "colored_depth": colorize_unit_depth(unit),
            }
            if output.get("uncertainty") is not None:
                uncertainty = output["uncertainty"].detach().float().cpu().numpy().astype(np.float32)
                result["uncertainty"] = uncertainty
                result["colored_uncertainty"] = colorize_uncertainty(uncertainty)
            formatted.append(result)
        return formatted[0] if len(formatted) == 1 else formatted


__all__ = ["MoADepthCLIPDepthEstimationPipeline"]
