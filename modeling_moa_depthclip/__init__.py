"""MoA-DepthCLIP: metric monocular depth from CLIP ViT-B/32 with a prompt-guided Mixture-of-Adapters.

Importing this package registers its two models (MoA-DepthCLIP and the DepthCLIP zero-shot baseline) with
transformers' auto classes, so `AutoModelForDepthEstimation.from_pretrained(folder)` and transformers' stock
`pipeline("depth-estimation", model=folder)` work. It changes nothing else in transformers: the richer pipeline
(metric depth as NumPy, a colour-mapped image) is asked for explicitly, with
`pipeline("depth-estimation", model=folder, pipeline_class=MoADepthCLIPDepthEstimationPipeline)`, or comes from a
saved folder's own code with `trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoImageProcessor, AutoModelForDepthEstimation

from .configuration_depthclip import DEPTHCLIP_BIN_DEPTHS, DepthCLIPConfig
from .configuration_moa_depthclip import DEPTHCLIP_PROMPTS, MoADepthCLIPConfig
from .image_processing_moa_depthclip import ImageLoadError, MoADepthCLIPImageProcessor, load_image_file
from .modeling_depthclip import DepthCLIPDepthEstimatorOutput, DepthCLIPForDepthEstimation
from .modeling_moa_depthclip import (
    MoADepthCLIPDepthEstimatorOutput,
    MoADepthCLIPForDepthEstimation,
    MoADepthCLIPPreTrainedModel,
)
from .pipeline_moa_depthclip import MoADepthCLIPDepthEstimationPipeline


__version__ = "0.1.0"

for _config_class, _model_class in [
    (MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation),
    (DepthCLIPConfig, DepthCLIPForDepthEstimation),
]:
    AutoConfig.register(_config_class.model_type, _config_class, exist_ok=True)
    AutoModelForDepthEstimation.register(_config_class, _model_class, exist_ok=True)
    AutoImageProcessor.register(
        _config_class,
        image_processor_classes={"pil": MoADepthCLIPImageProcessor, "torchvision": MoADepthCLIPImageProcessor},
        exist_ok=True,
    )
    # save_pretrained then writes `auto_map` and copies the code, so saved folders load with trust_remote_code=True
    _config_class.register_for_auto_class()
    _model_class.register_for_auto_class("AutoModelForDepthEstimation")
MoADepthCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")
del _config_class, _model_class

__all__ = [
    "DEPTHCLIP_BIN_DEPTHS",
    "DEPTHCLIP_PROMPTS",
    "DepthCLIPConfig",
    "DepthCLIPDepthEstimatorOutput",
    "DepthCLIPForDepthEstimation",
    "ImageLoadError",
    "MoADepthCLIPConfig",
    "MoADepthCLIPDepthEstimationPipeline",
    "MoADepthCLIPDepthEstimatorOutput",
    "MoADepthCLIPForDepthEstimation",
    "MoADepthCLIPImageProcessor",
    "MoADepthCLIPPreTrainedModel",
    "load_image_file",
]
