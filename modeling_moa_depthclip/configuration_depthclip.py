"""Configuration of DepthCLIP's zero-shot depth on a CLIP ViT, the baseline MoA-DepthCLIP is compared with."""

from transformers import CLIPVisionConfig, PreTrainedConfig

from .configuration_moa_depthclip import (
    CUSTOM_PIPELINES,
    DEFAULT_LOSS_WEIGHTS,
    DEPTHCLIP_PROMPTS,
    LOADED_AS_REMOTE_CODE,
    validate_depth_range,
    validate_loss_settings,
    vision_config_from,
)


# DepthCLIP's depth in metres for each of its prompts' words (Zhang et al., 2022), in the order of DEPTHCLIP_PROMPTS
DEPTHCLIP_BIN_DEPTHS = [1.00, 1.50, 2.00, 2.25, 2.50, 2.75, 3.00]


class DepthCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of [`DepthCLIPForDepthEstimation`]: DepthCLIP's zero-shot rule on a CLIP ViT (no decoder, no
    adapters, nothing trained). Each last-layer patch token goes through CLIP's `post_layernorm` and visual
    projection; its cosine with each prompt's CLIP text features times `logit_scale`, divided by `prompt_temperature`, is
    softmaxed over the prompts, and the depth is the expectation of `bin_depths` on the patch grid, upsampled
    bilinearly to the input size.

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower. Defaults to OpenAI CLIP ViT-B/32.
        depth_prompts (`list[str]`, *optional*): Prompts whose CLIP text embeddings the patches are scored against.
            Defaults to the seven DepthCLIP prompts.
        prompt_embedding_dim (`int`, *optional*):
            Width of the prompt text embeddings (CLIP's projection dim). Defaults to `vision_config.projection_dim`.
        bin_depths (`list[float]`, *optional*): Depth in metres of each prompt. Defaults to DepthCLIP's
            (1.00, 1.50, 2.00, 2.25, 2.50, 2.75, 3.00) for its seven prompts.
        logit_scale (`float`, *optional*, defaults to 100.0): Scale of the cosines (CLIP's, as DepthCLIP).
        prompt_temperature (`float`, *optional*, defaults to 0.1): Softmax temperature of DepthCLIP (not named
            `temperature`, which transformers reserves for generation).
        min_depth (`float`, *optional*, defaults to 1e-3): Smallest depth the labels may hold, metres.
        max_depth (`float`, *optional*, defaults to 10.0): Largest depth the labels may hold, metres.
        loss_weights (`dict[str, float]`, *optional*): Weights of `l1`, `silog`, `gradient`, `ssim` in the loss
            reported with `labels` (`bin_ce` has no bins to apply to here).
        silog_lambda (`float`, *optional*, defaults to 0.85): Variance focus of the SILog loss.
    """

    model_type = "depthclip_zero_shot"
    sub_configs = {"vision_config": CLIPVisionConfig}
    keys_to_ignore_at_inference = [
        "hidden_states", "attentions", "prompt_logits", "depth_uncertainty", "loss_components", "valid_label_mask"
    ]

    def __init__(
        self,
        vision_config=None,
        depth_prompts=None,
        prompt_embedding_dim=None,
        bin_depths=None,
        logit_scale=100.0,
        prompt_temperature=0.1,
        min_depth=1e-3,
        max_depth=10.0,
        loss_weights=None,
        silog_lambda=0.85,
        initializer_range=0.02,
        **kwargs,
    ):
        self.vision_config = vision_config_from(vision_config)
        self.depth_prompts = list(depth_prompts) if depth_prompts is not None else list(DEPTHCLIP_PROMPTS)
        self.prompt_embedding_dim = (
            prompt_embedding_dim if prompt_embedding_dim is not None else self.vision_config.projection_dim
        )
        if bin_depths is None and self.depth_prompts == DEPTHCLIP_PROMPTS:
            bin_depths = DEPTHCLIP_BIN_DEPTHS
        self.bin_depths = [float(d) for d in bin_depths] if bin_depths else None
        self.logit_scale = float(logit_scale)
        self.prompt_temperature = float(prompt_temperature)
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        self.silog_lambda = silog_lambda
        self.initializer_range = initializer_range
        # as MoADepthCLIPConfig: only the remote-code copy claims the task for the folder's own pipeline
        custom_pipelines = kwargs.pop("custom_pipelines", None)
        super().__init__(**kwargs)
        if LOADED_AS_REMOTE_CODE and custom_pipelines:
            self.custom_pipelines = custom_pipelines
        self.validate_depthclip_config()

    def validate_depthclip_config(self):
        """Raise a `ValueError` naming the field for any value the model cannot be built with."""
        if not self.depth_prompts or not all(isinstance(p, str) and p.strip() for p in self.depth_prompts):
            raise ValueError("depth_prompts must be a non-empty list of non-empty strings")
        validate_depth_range(self.min_depth, self.max_depth)
        depths = self.bin_depths
        if depths is None or len(depths) != len(self.depth_prompts):
            raise ValueError(
                f"bin_depths needs one depth per prompt ({len(self.depth_prompts)} prompts), got {depths}"
            )
        outside = [d for d in depths if not self.min_depth <= d <= self.max_depth]
        if outside:
            raise ValueError(
                f"bin_depths {outside} lie outside [min_depth, max_depth] = [{self.min_depth}, {self.max_depth}]"
            )
        if not self.prompt_temperature > 0:
            raise ValueError(f"prompt_temperature must be > 0, got {self.prompt_temperature}")
        validate_loss_settings(self.loss_weights, self.silog_lambda)

    def to_dict(self):
        output = super().to_dict()
        output["custom_pipelines"] = CUSTOM_PIPELINES
        return output


__all__ = ["DEPTHCLIP_BIN_DEPTHS", "DepthCLIPConfig"]
