"""MoA-DepthCLIP: metric monocular depth from CLIP ViT-B/32 with a prompt-guided Mixture-of-Adapters.

Importing this package registers the model with transformers' auto classes and routes MoA-DepthCLIP models of the
`depth-estimation` task to `MoADepthCLIPDepthEstimationPipeline` (other models keep their pipeline), so
`AutoModelForDepthEstimation.from_pretrained(folder)` and `pipeline("depth-estimation", model=folder)` work.
"""

import logging as _logging

from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForDepthEstimation,
)
from transformers.pipelines import PIPELINE_REGISTRY

from .configuration_moa_depthclip import DEPTHCLIP_PROMPTS, MoADepthCLIPConfig
from .image_processing_moa_depthclip import ImageLoadError, MoADepthCLIPImageProcessor, load_image_file
from .modeling_moa_depthclip import (
    MoADepthCLIPDepthEstimatorOutput,
    MoADepthCLIPForDepthEstimation,
    MoADepthCLIPPreTrainedModel,
)
from .pipeline_moa_depthclip import MoADepthCLIPDepthEstimationPipeline, depth_estimation_pipeline_for


__version__ = "0.1.0"

AutoConfig.register(MoADepthCLIPConfig.model_type, MoADepthCLIPConfig, exist_ok=True)
AutoModelForDepthEstimation.register(MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation, exist_ok=True)
AutoImageProcessor.register(
    MoADepthCLIPConfig,
    image_processor_classes={"pil": MoADepthCLIPImageProcessor, "torchvision": MoADepthCLIPImageProcessor},
    exist_ok=True,
)
# save_pretrained then writes `auto_map` and copies the code, so saved folders load with trust_remote_code=True
MoADepthCLIPConfig.register_for_auto_class()
MoADepthCLIPForDepthEstimation.register_for_auto_class("AutoModelForDepthEstimation")
MoADepthCLIPImageProcessor.register_for_auto_class("AutoImageProcessor")


def _register_pipeline():
    # The task keeps serving every other model with the class it had (transformers' own unless something else
    # replaced it); only MoA-DepthCLIP models get the richer pipeline. transformers warns when a task is
    # re-registered, which is expected here.
    from transformers.pipelines import _resolve_impl

    stock = PIPELINE_REGISTRY.supported_tasks["depth-estimation"]
    stock_class = _resolve_impl(stock["impl"])
    if getattr(stock_class, "_moa_depthclip_dispatch", False):  # registered already (a reload of this module)
        return
    dispatch = depth_estimation_pipeline_for(stock_class)
    dispatch._moa_depthclip_dispatch = True
    pipelines_logger = _logging.getLogger("transformers.pipelines.base")
    level = pipelines_logger.level
    pipelines_logger.setLevel(_logging.ERROR)
    try:
        PIPELINE_REGISTRY.register_pipeline(
            "depth-estimation",
            pipeline_class=dispatch,
            pt_model=stock.get("pt") or AutoModelForDepthEstimation,
            default=stock.get("default"),
            type=stock.get("type", "image"),
        )
    finally:
        pipelines_logger.setLevel(level)


_register_pipeline()

__all__ = [
    "DEPTHCLIP_PROMPTS",
    "ImageLoadError",
    "MoADepthCLIPConfig",
    "MoADepthCLIPDepthEstimationPipeline",
    "MoADepthCLIPDepthEstimatorOutput",
    "MoADepthCLIPForDepthEstimation",
    "MoADepthCLIPImageProcessor",
    "MoADepthCLIPPreTrainedModel",
    "load_image_file",
]
