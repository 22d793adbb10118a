"""PyTorch DepthCLIP zero-shot depth on a CLIP ViT: the baseline of MoA-DepthCLIP's comparison, nothing trained.

    pixels -> stock CLIP vision tower -> each last-layer patch token through CLIP's `post_layernorm` and visual
           projection -> cosine with the CLIP text features of the depth prompts -> softmax over the prompts ->
           expected prompt depth on the patch grid -> bilinear upsampling to the input size -> depth in metres.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import CLIPVisionModel
from transformers.modeling_outputs import DepthEstimatorOutput

from .configuration_depthclip import DepthCLIPConfig
from .losses import DepthLoss
from .modeling_moa_depthclip import CLIPDepthPreTrainedModel, check_pixel_values, init_prompt_embeddings, upsample_to_input
from .uncertainty import bin_distribution_std


@dataclass
class DepthCLIPDepthEstimatorOutput(DepthEstimatorOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): The depth loss of the prediction (no term trains anything), with `labels`.
    predicted_depth (`torch.FloatTensor` of shape `(batch_size, height, width)`): Depth in metres at the input size.
    prompt_logits (`torch.FloatTensor` of shape `(batch_size, num_prompts, grid_height, grid_width)`):
        `logit_scale * cos / prompt_temperature` of each patch with each prompt.
    depth_uncertainty (`torch.FloatTensor` of shape `(batch_size, height, width)`):
        Standard deviation in metres of each patch's distribution over the prompts' depths, at the input size.
    loss_components (`dict[str, torch.FloatTensor]`, *optional*): Each unweighted loss term, detached.
    valid_label_mask (`torch.BoolTensor` of shape `(batch_size, label_height, label_width)`, *optional*):
        The label pixels the loss used (finite, within `[config.min_depth, config.max_depth]`), with `labels`.
    """

    prompt_logits: torch.FloatTensor | None = None
    depth_uncertainty: torch.FloatTensor | None = None
    loss_components: dict | None = None
    valid_label_mask: torch.BoolTensor | None = None


class DepthPromptScorer(nn.Module):
    """Tokens mapped into CLIP's joint image-text space (CLIP's `post_layernorm`, then its visual projection) and
    scored against the frozen CLIP text features of the depth prompts, like CLIP zero-shot classification."""

    def __init__(self, config: DepthCLIPConfig):
        super().__init__()
        # CLIP text features of `config.depth_prompts`, L2-normalised; written by the conversion script
        self.register_buffer(
            "prompt_embeddings", torch.zeros(len(config.depth_prompts), config.prompt_embedding_dim), persistent=True
        )
        self.image_projection = nn.Linear(config.vision_config.hidden_size, config.prompt_embedding_dim, bias=False)

    def forward(self, tokens: torch.Tensor, post_layernorm: nn.Module, scale: float) -> torch.Tensor:
        """`scale` times the cosine of each token with each prompt, `(batch, tokens, num_prompts)`."""
        embeddings = F.normalize(self.image_projection(post_layernorm(tokens)), dim=-1)
        return scale * embeddings @ self.prompt_embeddings.to(embeddings.dtype).t()


class DepthCLIPPreTrainedModel(CLIPDepthPreTrainedModel):
    config: DepthCLIPConfig
    config_class = DepthCLIPConfig
    base_model_prefix = "depthclip"
    _no_split_modules = ["CLIPEncoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, DepthPromptScorer):
            init_prompt_embeddings(module.prompt_embeddings)


class DepthCLIPForDepthEstimation(DepthCLIPPreTrainedModel):
    """DepthCLIP's zero-shot depth (Zhang et al., 2022) on a CLIP ViT: each patch's depth is the expectation of the
    prompts' depths `config.bin_depths` under `softmax_k(logit_scale * cos(patch, prompt_k) / prompt_temperature)`.

    `vision_model` is a stock `CLIPVisionModel` and `semantic_context` holds CLIP's visual projection and the
    prompts' text features (the keys MoA-DepthCLIP uses for the same tensors). Nothing trains.
    """

    def __init__(self, config: DepthCLIPConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.semantic_context = DepthPromptScorer(config)
        self.depth_loss = DepthLoss(config)
        self.post_init()
        self.apply_trainable_mask()

    def is_trainable_parameter(self, name: str) -> bool:
        return False  # zero-shot

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> DepthCLIPDepthEstimatorOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Images normalised by [`MoADepthCLIPImageProcessor`]; position embeddings are interpolated to their size.
        labels (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth depth in metres, for the loss terms (evaluation only: nothing trains).
        """
        config = self.config
        return_dict = return_dict if return_dict is not None else config.return_dict
        output_hidden_states = output_hidden_states if output_hidden_states is not None else config.output_hidden_states
        pixel_values = check_pixel_values(pixel_values, config.vision_config)
        height, width = pixel_values.shape[-2:]
        patch_size, image_size = config.vision_config.patch_size, config.vision_config.image_size
        outputs = self.vision_model(
            pixel_values,
            output_hidden_states=output_hidden_states,
            interpolate_pos_encoding=(height, width) != (image_size, image_size),
        )
        grid = (height // patch_size, width // patch_size)
        scaled = self.semantic_context(outputs.last_hidden_state[:, 1:], self.vision_model.post_layernorm, config.logit_scale)
        logits = scaled / config.prompt_temperature
        probabilities = logits.float().softmax(dim=-1)
        bin_depths = torch.tensor(config.bin_depths, device=probabilities.device, dtype=probabilities.dtype)
        depth = (probabilities @ bin_depths).unflatten(1, grid)
        predicted_depth = upsample_to_input(depth, pixel_values)
        spread = bin_distribution_std(probabilities, bin_depths, dim=-1).unflatten(1, grid)

        loss_output = self.depth_loss(predicted_depth, None, labels, []) if labels is not None else None
        loss = loss_output.loss if loss_output is not None else None
        if not return_dict:
            output = (predicted_depth,) + ((outputs.hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        return DepthCLIPDepthEstimatorOutput(
            loss=loss,
            predicted_depth=predicted_depth,
            hidden_states=outputs.hidden_states if output_hidden_states else None,
            prompt_logits=logits.transpose(1, 2).unflatten(2, grid),
            depth_uncertainty=upsample_to_input(spread, pixel_values),
            loss_components=loss_output.components if loss_output is not None else None,
            valid_label_mask=loss_output.valid_mask if loss_output is not None else None,
        )


__all__ = ["DepthCLIPDepthEstimatorOutput", "DepthCLIPForDepthEstimation", "DepthCLIPPreTrainedModel"]
