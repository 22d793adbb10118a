"""PyTorch MoA-DepthCLIP: CLIP ViT adapted to metric depth by a prompt-guided Mixture-of-Adapters.

Data flow, pixels to metres (see `MoADepthCLIPForDepthEstimation.forward`):

    pixels -> CLIP patch embedding -> CLIP blocks, each chosen block followed by a `MixtureOfAdapters`
           whose router is guided by the `GlobalSemanticContext` (the image's similarity to CLIP text embeddings
           of depth prompts) [`MoADepthCLIPEncoder`] -> adapted patch tokens of the MoA blocks -> decoder
           (`MultiScaleDepthDecoder` or `PatchGridDecoder`) -> `HybridDepthHead` (`BinClassificationHead` +
           `RegressionHead`, fused per pixel) -> bilinear upsampling to the input size -> depth in metres.
"""

import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from safetensors import SafetensorError
from torch import nn
from transformers import CLIPVisionModel, PreTrainedModel
from transformers import initialization as init
from transformers.dynamic_module_utils import custom_object_save
from transformers.modeling_outputs import DepthEstimatorOutput
from transformers.utils import ModelOutput

from .configuration_moa_depthclip import MoADepthCLIPConfig
from .loading import WeightsFileError, check_model_folder, check_weights
from .losses import DepthLoss, depth_bin_centers, depth_bin_edges  # noqa: F401  (depth_bin_edges: importable here)
from .pipeline_moa_depthclip import MoADepthCLIPDepthEstimationPipeline
from .uncertainty import bin_distribution_std


@dataclass
class MoADepthCLIPDepthEstimatorOutput(DepthEstimatorOutput):
    r"""
    loss (`torch.FloatTensor`, *optional*): The composite loss, returned when `labels` are given.
    predicted_depth (`torch.FloatTensor` of shape `(batch_size, height, width)`):
        Depth in metres at the input resolution, within `[config.min_depth, config.max_depth]`.
    classification_depth (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`):
        Expected depth under the bin probabilities, on the head's output grid.
    regression_depth (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`):
        Depth of the direct regression branch, on the head's output grid.
    fusion_weight (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`):
        Per-pixel weight of the classification branch in the fused depth.
    bin_logits (`torch.FloatTensor` of shape `(batch_size, num_depth_bins, grid_height, grid_width)`)
    depth_uncertainty (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
        Standard deviation in metres of the per-pixel bin distribution, upsampled like `predicted_depth`; None for
        `head="regression"` (no bins).
    router_probs (`torch.FloatTensor` of shape `(batch_size, num_moa_layers, num_experts)`):
        Mean gate of each expert over the image's tokens, per MoA layer.
    prompt_probs (`torch.FloatTensor` of shape `(batch_size, num_prompts)`):
        The image's softmax similarity to each depth prompt (from the last MoA layer's context).
    router_aux_loss (`torch.FloatTensor`, *optional*): The auxiliary router loss, unweighted (with `labels`).
    loss_components (`dict[str, torch.FloatTensor]`, *optional*): Each unweighted loss term, detached.
    valid_label_mask (`torch.BoolTensor` of shape `(batch_size, label_height, label_width)`, *optional*):
        The label pixels the loss supervised (finite, within `[config.min_depth, config.max_depth]`), with `labels`.
    """

    classification_depth: torch.FloatTensor | None = None
    regression_depth: torch.FloatTensor | None = None
    fusion_weight: torch.FloatTensor | None = None
    bin_logits: torch.FloatTensor | None = None
    depth_uncertainty: torch.FloatTensor | None = None
    router_probs: torch.FloatTensor | None = None
    prompt_probs: torch.FloatTensor | None = None
    router_aux_loss: torch.FloatTensor | None = None
    loss_components: dict | None = None
    valid_label_mask: torch.BoolTensor | None = None


class GlobalSemanticContext(nn.Module):
    """The global semantic context vector: how an image relates to CLIP text embeddings of depth prompts.

    The image's CLS token is mapped into CLIP's joint image-text space (CLIP's own `post_layernorm` and visual
    projection), scored against the frozen prompt embeddings like CLIP zero-shot classification, and the
    prompt-weighted text embedding is fused with the image embedding into one vector per image.
    """

    def __init__(self, config: MoADepthCLIPConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        embed_dim = config.prompt_embedding_dim
        # CLIP text features of `config.depth_prompts`, L2-normalised; written by the conversion script.
        self.register_buffer("prompt_embeddings", torch.zeros(len(config.depth_prompts), embed_dim), persistent=True)
        self.image_projection = nn.Linear(hidden_size, embed_dim, bias=False)
        self.logit_scale = nn.Parameter(torch.tensor(math.log(100.0)))
        self.fuse = nn.Sequential(nn.Linear(2 * embed_dim, config.context_dim), nn.GELU())

    def forward(self, cls_token: torch.Tensor, post_layernorm: nn.Module):
        image_embedding = F.normalize(self.image_projection(post_layernorm(cls_token)), dim=-1)
        prompts = self.prompt_embeddings.to(image_embedding.dtype)
        prompt_probs = (self.logit_scale.exp() * image_embedding @ prompts.t()).softmax(dim=-1)
        text_context = prompt_probs @ prompts
        return self.fuse(torch.cat([image_embedding, text_context], dim=-1)), prompt_probs


class PromptGuidedRouter(nn.Module):
    """Per-token soft gate over the experts, shifted by the image's semantic context.

    Token and context are projected into one hidden space and added, so every token is routed by what it is
    *and* by what the whole scene is (Linear(768->128) -> ReLU -> Linear(128->E) in the authors' prototype,
    plus the context term).
    """

    def __init__(self, config: MoADepthCLIPConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.token_proj = nn.Linear(hidden_size, config.router_hidden_size)
        if config.prompt_guided_router:
            self.context_proj = nn.Linear(config.context_dim, config.router_hidden_size, bias=False)
        self.gate = nn.Linear(config.router_hidden_size, config.num_experts)
        self.top_k = config.router_top_k if config.router_type == "topk" else None

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor | None) -> torch.Tensor:
        hidden = self.token_proj(hidden_states)
        if context is not None:
            hidden = hidden + self.context_proj(context).unsqueeze(1)
        hidden = F.relu(hidden)
        gates = self.gate(hidden).float().softmax(dim=-1)
        if self.top_k is not None and self.top_k < gates.shape[-1]:
            top_values, top_indices = gates.topk(self.top_k, dim=-1)
            gates = torch.zeros_like(gates).scatter(-1, top_indices, top_values)
            gates = gates / gates.sum(dim=-1, keepdim=True)
        return gates


class AdapterExperts(nn.Module):
    """`num_experts` bottleneck adapters Linear(D->r) -> GELU -> Linear(r->D), evaluated together.

    Expert `e` owns rows `e*r:(e+1)*r` of `down_proj.weight`, columns `e*r:(e+1)*r` of `up_proj.weight` and row
    `e` of `up_bias`. Gating before the up-projection turns the mixture into two matmuls:
    `sum_e g_e (h_e U_e + b_e) = concat_e(g_e h_e) U + g b`.
    """

    def __init__(self, config: MoADepthCLIPConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.num_experts = config.num_experts
        self.bottleneck = config.adapter_bottleneck
        self.down_proj = nn.Linear(hidden_size, self.num_experts * self.bottleneck)
        self.up_proj = nn.Linear(self.num_experts * self.bottleneck, hidden_size, bias=False)
        self.up_bias = nn.Parameter(torch.zeros(self.num_experts, hidden_size))
        self.act = nn.GELU()

    def forward(self, hidden_states: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        batch, tokens, _ = hidden_states.shape
        bottleneck = self.act(self.down_proj(hidden_states)).view(batch, tokens, self.num_experts, self.bottleneck)
        gates = gates.to(bottleneck.dtype)
        mixed = (bottleneck * gates.unsqueeze(-1)).view(batch, tokens, -1)
        return self.up_proj(mixed) + gates @ self.up_bias.to(bottleneck.dtype)


class MixtureOfAdapters(nn.Module):
    """Mixture-of-Adapters after one CLIP block: `x + sum_e g_e(x, context) * E_e(x)`.

    Attached by composition: it reads the block's output and never touches the block's own weights.
    """

    def __init__(self, config: MoADepthCLIPConfig):
        super().__init__()
        self.router = PromptGuidedRouter(config)
        self.experts = AdapterExperts(config)

    def forward(self, hidden_states: torch.Tensor, context: torch.Tensor):
        gates = self.router(hidden_states, context)
        return hidden_states + self.experts(hidden_states, gates), gates


class ResidualConvUnit(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(F.relu(self.conv1(F.relu(x))))


class DetailStem(nn.Module):
    """Two stride-2 convolutions on the pixels: the edges a 32-pixel patch grid cannot see, at 1/4 resolution."""

    def __init__(self, num_channels: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(num_channels, out_channels // 2, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(out_channels // 2, out_channels, 3, stride=2, padding=1)

    def forward(self, pixel_values):
        return self.conv2(F.gelu(self.conv1(pixel_values)))


def _quarter_size(height: int, width: int) -> tuple[int, int]:
    return (height + 3) // 4, (width + 3) // 4


class ReassembleStage(nn.Module):
    """Patch tokens of each MoA layer -> normalised, projected feature maps assigned to a decoder level.

    Shallower layers go to finer levels (DPT's reassembling); level 0 is the patch grid, the last level is a
    quarter of the input resolution.
    """

    def __init__(self, config: MoADepthCLIPConfig, level_channels: list[int]):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        num_features = len(config.moa_layers)
        num_levels = len(level_channels)
        # the deepest feature starts at level 0, the shallowest lands on the finest level
        self.levels = [
            round((num_features - 1 - i) * (num_levels - 1) / max(num_features - 1, 1)) for i in range(num_features)
        ]
        self.norms = nn.ModuleList(nn.LayerNorm(hidden_size) for _ in range(num_features))
        self.projections = nn.ModuleList(
            nn.Linear(hidden_size, level_channels[level]) for level in self.levels
        )

    def forward(self, patch_tokens: list[torch.Tensor], grid: tuple[int, int]) -> list[tuple[int, torch.Tensor]]:
        maps = []
        for tokens, norm, projection, level in zip(patch_tokens, self.norms, self.projections, self.levels):
            feature = projection(norm(tokens)).transpose(1, 2).unflatten(2, grid)
            maps.append((level, feature))
        return maps


class FeatureFusionStage(nn.Module):
    """Coarse to fine: upsample x2, reduce channels, add the features of this level, refine with a residual unit."""

    def __init__(self, level_channels: list[int]):
        super().__init__()
        self.transitions = nn.ModuleList(
            nn.Conv2d(level_channels[i - 1], level_channels[i], 1) for i in range(1, len(level_channels))
        )
        self.refine = nn.ModuleList(ResidualConvUnit(c) for c in level_channels)

    def forward(self, level_features: list[tuple[int, torch.Tensor]], sizes: list[tuple[int, int]], detail):
        fused = None
        for level, size in enumerate(sizes):
            if fused is not None:
                fused = self.transitions[level - 1](F.interpolate(fused, size=size, mode="bilinear"))
            for feature_level, feature in level_features:
                if feature_level == level:
                    feature = F.interpolate(feature, size=size, mode="bilinear") if feature.shape[-2:] != size else feature
                    fused = feature if fused is None else fused + feature
            if level == len(sizes) - 1:
                fused = fused + detail
            fused = self.refine[level](fused)
        return fused


class MultiScaleDepthDecoder(nn.Module):
    """Light DPT-style decoder: fuses the MoA layers' features with an RGB detail stem at 1/4 input resolution.

    A prediction on the 7x7 ViT-B/32 grid caps RMSE on NYU near 0.41 m whatever the network learns; predicting at
    a quarter of the input resolution removes that cap.
    """

    def __init__(self, config: MoADepthCLIPConfig):
        super().__init__()
        patch_size = config.vision_config.patch_size
        num_levels = max(1, round(math.log2(max(patch_size / 4, 1)))) + 1
        self.level_channels = [max(config.decoder_hidden_size >> level, 32) for level in range(num_levels)]
        self.reassemble = ReassembleStage(config, self.level_channels)
        self.detail_stem = DetailStem(config.vision_config.num_channels, self.level_channels[-1])
        self.fusion = FeatureFusionStage(self.level_channels)
        self.out_channels = self.level_channels[-1]

    def forward(self, patch_tokens, grid, pixel_values):
        height, width = pixel_values.shape[-2:]
        quarter = _quarter_size(height, width)
        num_levels = len(self.level_channels)
        # geometric steps from the patch grid to the quarter-resolution grid
        sizes = [
            tuple(
                max(1, round(g * (q / g) ** (level / max(num_levels - 1, 1)))) for g, q in zip(grid, quarter)
            )
            for level in range(num_levels)
        ]
        sizes[-1] = quarter
        detail = self.detail_stem(pixel_values.to(self.detail_stem.conv1.weight.dtype))
        if detail.shape[-2:] != quarter:
            detail = F.interpolate(detail, size=quarter, mode="bilinear")
        return self.fusion(self.reassemble(patch_tokens, grid), sizes, detail)


class PatchGridDecoder(nn.Module):
    """The authors' design: the MoA layers' patch tokens averaged and projected, predicted on the patch grid."""

    def __init__(self, config: MoADepthCLIPConfig):
        super().__init__()
        hidden_size = config.vision_config.hidden_size
        self.norm = nn.LayerNorm(hidden_size)
        self.projection = nn.Linear(hidden_size, config.decoder_hidden_size)
        self.out_channels = config.decoder_hidden_size

    def forward(self, patch_tokens, grid, pixel_values):
        tokens = torch.stack(patch_tokens, dim=0).mean(dim=0)
        return F.gelu(self.projection(self.norm(tokens))).transpose(1, 2).unflatten(2, grid)


@dataclass
class DepthBinsOutput(ModelOutput):
    r"""
    depth (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`):
        Expected depth in metres under the bin probabilities, `sum_k bin_probabilities_k * bin_centers_k`.
    bin_logits (`torch.FloatTensor` of shape `(batch_size, num_depth_bins, grid_height, grid_width)`)
    bin_probabilities (`torch.FloatTensor` of shape `(batch_size, num_depth_bins, grid_height, grid_width)`):
        Softmax of `bin_logits` over the bins, float32.
    bin_centers (`torch.FloatTensor` of shape `(num_depth_bins,)`): Depth of each bin's centre, metres.
    """

    depth: torch.FloatTensor | None = None
    bin_logits: torch.FloatTensor | None = None
    bin_probabilities: torch.FloatTensor | None = None
    bin_centers: torch.FloatTensor | None = None


@dataclass
class DepthRegressionOutput(ModelOutput):
    r"""
    depth (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`): Regressed depth in metres.
    """

    depth: torch.FloatTensor | None = None


@dataclass
class DepthHeadOutput(ModelOutput):
    r"""
    depth (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`): The head's depth in metres.
    classification ([`DepthBinsOutput`], *optional*): The depth-bin branch, when the head has one.
    regression_depth (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`, *optional*):
        The regression branch's depth, when the head has one.
    fusion_weight (`torch.FloatTensor` of shape `(batch_size, grid_height, grid_width)`, *optional*):
        Per-pixel weight of the classification branch in the fused depth (hybrid head only).
    """

    depth: torch.FloatTensor | None = None
    classification: DepthBinsOutput | None = None
    regression_depth: torch.FloatTensor | None = None
    fusion_weight: torch.FloatTensor | None = None


# Both branch heads are the 1x1 convolutions they are (keys `weight`, `bias` under their name in the head), with a
# forward that turns the convolution's output into depth.


class BinClassificationHead(nn.Conv2d):
    """Depth-bin classification: `num_depth_bins` logits per pixel (1x1 convolution); the depth is the expected bin
    centre `sum_k softmax(logits)_k * center_k`, the centres spaced as `config.bin_spacing` says."""

    def __init__(self, config: MoADepthCLIPConfig, in_channels: int):
        super().__init__(in_channels, config.num_depth_bins, 1)
        self.config = config

    def forward(self, features: torch.Tensor) -> DepthBinsOutput:
        bin_logits = super().forward(features)
        centers = depth_bin_centers(self.config, device=features.device, dtype=torch.float32)
        probabilities = bin_logits.float().softmax(dim=1)
        depth = torch.einsum("bkhw,k->bhw", probabilities, centers)
        return DepthBinsOutput(
            depth=depth, bin_logits=bin_logits, bin_probabilities=probabilities, bin_centers=centers
        )


class RegressionHead(nn.Conv2d):
    """Direct regression: one value per pixel (1x1 convolution), `sigmoid` mapped onto [min_depth, max_depth],
    in log depth for log-spaced bins."""

    def __init__(self, config: MoADepthCLIPConfig, in_channels: int):
        super().__init__(in_channels, 1, 1)
        self.min_depth, self.max_depth = config.min_depth, config.max_depth
        self.log_depth = config.bin_spacing == "log"

    def forward(self, features: torch.Tensor) -> DepthRegressionOutput:
        unit = torch.sigmoid(super().forward(features).float()).squeeze(1)
        if self.log_depth:
            low, high = math.log(self.min_depth), math.log(self.max_depth)
            return DepthRegressionOutput(depth=torch.exp(low + unit * (high - low)))
        return DepthRegressionOutput(depth=self.min_depth + unit * (self.max_depth - self.min_depth))


class HybridDepthHead(nn.Module):
    """Depth-bin classification plus direct regression, fused by a learned per-pixel weight:
    `w * classification + (1 - w) * regression`, `w = sigmoid(fusion_gate(features))`. Both branches lie in
    [min_depth, max_depth], so the fused depth does too.

    The head ablations (`config.head="classification"` or `"regression"`) build only that branch and no gate; the
    depth is then that branch's.
    """

    def __init__(self, config: MoADepthCLIPConfig, in_channels: int):
        super().__init__()
        classifies, regresses = config.head in ("hybrid", "classification"), config.head in ("hybrid", "regression")
        self.bin_classifier = BinClassificationHead(config, in_channels) if classifies else None
        self.regressor = RegressionHead(config, in_channels) if regresses else None
        self.fusion_gate = nn.Conv2d(in_channels, 1, 1) if classifies and regresses else None

    def forward(self, features: torch.Tensor) -> DepthHeadOutput:
        classification = self.bin_classifier(features) if self.bin_classifier is not None else None
        regression = self.regressor(features).depth if self.regressor is not None else None
        if self.fusion_gate is None:
            depth = classification.depth if classification is not None else regression
            return DepthHeadOutput(depth=depth, classification=classification, regression_depth=regression)
        weight = torch.sigmoid(self.fusion_gate(features).float()).squeeze(1)
        depth = weight * classification.depth + (1 - weight) * regression
        return DepthHeadOutput(
            depth=depth, classification=classification, regression_depth=regression, fusion_weight=weight
        )


@dataclass
class MoADepthCLIPEncoderOutput(ModelOutput):
    r"""
    last_hidden_state (`torch.FloatTensor` of shape `(batch_size, 1 + num_patches, hidden_size)`):
        The last block's output, adapted if a MoA follows it.
    patch_tokens (`tuple[torch.FloatTensor]`): The adapted patch tokens (no CLS) of each block of `moa_layers`.
    patch_grid (`tuple[int, int]`): Height and width of the patch grid.
    router_gates (`tuple[torch.FloatTensor]`): Gates `(batch_size, tokens, num_experts)` of each MoA.
    prompt_probs (`torch.FloatTensor` of shape `(batch_size, num_prompts)`, *optional*):
        The image's softmax similarity to each depth prompt, from the last MoA's semantic context.
    hidden_states (`tuple[torch.FloatTensor]`, *optional*): The input of every block and the last output.
    """

    last_hidden_state: torch.FloatTensor | None = None
    patch_tokens: tuple | None = None
    patch_grid: tuple | None = None
    router_gates: tuple | None = None
    prompt_probs: torch.FloatTensor | None = None
    hidden_states: tuple | None = None


class MoADepthCLIPEncoder(nn.Module):
    """CLIP's vision blocks with a Mixture-of-Adapters after each block of `config.moa_layers`, and the memory
    policy of training:

    - the leading blocks in which nothing trains (nor before them) run without an autograd graph;
    - with `config.checkpoint_frozen_layers`, a frozen block after a trainable module is recomputed in the backward
      pass instead of storing its activations (it only passes gradients back).

    It uses the model's `vision_model`, `moa` and `semantic_context` and owns no weights: they stay registered on
    the model, so their keys remain `vision_model.*` (CLIP's own layout), `moa.*` and `semantic_context.*`.
    """

    def __init__(self, config: MoADepthCLIPConfig, vision_model: CLIPVisionModel, moa: nn.ModuleDict, semantic_context):
        super().__init__()
        self.config = config
        # plain attributes, not submodules: registered twice, every weight would get a second key
        object.__setattr__(self, "vision_model", vision_model)
        object.__setattr__(self, "moa", moa)
        object.__setattr__(self, "semantic_context", semantic_context)

    @staticmethod
    def _is_frozen_block(layer) -> bool:
        # a block that checkpoints itself (gradient checkpointing enabled) needs no second wrapper
        return not layer.gradient_checkpointing and not any(p.requires_grad for p in layer.parameters())

    def frozen_prefix_length(self) -> int:
        """Number of leading blocks that can run without an autograd graph (nothing in or before them trains)."""
        vision = self.vision_model
        if any(p.requires_grad for p in vision.embeddings.parameters()) or any(
            p.requires_grad for p in vision.pre_layrnorm.parameters()
        ):
            return 0
        count = 0
        for layer in vision.encoder.layers:
            if any(p.requires_grad for p in layer.parameters()):
                break
            count += 1
        # the first MoA's router needs the graph from its own block's output onwards, not before
        return min(count, self.config.moa_layers[0] + 1) if self.config.moa_layers else count

    def forward(self, pixel_values: torch.Tensor, output_hidden_states: bool = False) -> MoADepthCLIPEncoderOutput:
        vision = self.vision_model
        height, width = pixel_values.shape[-2:]
        patch_size, image_size = self.config.vision_config.patch_size, self.config.vision_config.image_size
        grad_enabled = torch.is_grad_enabled()
        frozen_prefix = self.frozen_prefix_length() if grad_enabled else 0
        recompute_frozen = self.config.checkpoint_frozen_layers and self.training and grad_enabled
        moa_layers = set(self.config.moa_layers)
        all_hidden_states, patch_tokens, router_gates = [], [], []
        prompt_probs = None

        with torch.set_grad_enabled(grad_enabled and frozen_prefix == 0):
            hidden_states = vision.embeddings(
                pixel_values, interpolate_pos_encoding=(height, width) != (image_size, image_size)
            )
            hidden_states = vision.pre_layrnorm(hidden_states)
        for index, layer in enumerate(vision.encoder.layers):
            if output_hidden_states:
                all_hidden_states.append(hidden_states)
            with torch.set_grad_enabled(grad_enabled and index >= frozen_prefix):
                if recompute_frozen and index >= frozen_prefix and self._is_frozen_block(layer):
                    hidden_states = torch.utils.checkpoint.checkpoint(
                        layer, hidden_states, attention_mask=None, use_reentrant=False
                    )
                else:
                    hidden_states = layer(hidden_states, attention_mask=None)
            if str(index) in self.moa:
                context = None
                if self.config.prompt_guided_router:
                    context, prompt_probs = self.semantic_context(hidden_states[:, 0], vision.post_layernorm)
                hidden_states, gates = self.moa[str(index)](hidden_states, context)
                router_gates.append(gates)
            if index in moa_layers:
                patch_tokens.append(hidden_states[:, 1:])
        if output_hidden_states:
            all_hidden_states.append(hidden_states)
        return MoADepthCLIPEncoderOutput(
            last_hidden_state=hidden_states,
            patch_tokens=tuple(patch_tokens),
            patch_grid=(height // patch_size, width // patch_size),
            router_gates=tuple(router_gates),
            prompt_probs=prompt_probs,
            hidden_states=tuple(all_hidden_states) if output_hidden_states else None,
        )


def upsample_to_input(values: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
    """A `(batch, h, w)` map on the head's grid, upsampled bilinearly (half-pixel centres) to the input size."""
    return F.interpolate(values.unsqueeze(1), size=pixel_values.shape[-2:], mode="bilinear").squeeze(1)


def check_pixel_values(pixel_values, vision_config) -> torch.Tensor:
    """`pixel_values` as a CLIP ViT of `vision_config` takes them; a `ValueError` names the shape otherwise."""
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.dim() != 4:
        shape = tuple(pixel_values.shape) if isinstance(pixel_values, torch.Tensor) else type(pixel_values)
        raise ValueError(f"pixel_values must be a tensor of shape (batch, channels, height, width), got {shape}")
    channels, patch_size = vision_config.num_channels, vision_config.patch_size
    if pixel_values.shape[1] != channels:
        raise ValueError(f"pixel_values has {pixel_values.shape[1]} channels, the model expects {channels}")
    height, width = pixel_values.shape[-2:]
    if height < patch_size or width < patch_size:
        raise ValueError(
            f"pixel_values is {height}x{width}; height and width must be at least the patch size {patch_size}"
        )
    if height % patch_size or width % patch_size:
        raise ValueError(
            f"pixel_values is {height}x{width}; height and width must be multiples of the patch size "
            f"{patch_size} (the image processor resizes to such a size)"
        )
    return pixel_values


class CLIPDepthPreTrainedModel(PreTrainedModel):
    """What every depth model on a CLIP ViT of this package shares: pixels in, `from_pretrained` checked by the
    package's loader, the depth-estimation pipeline saved with the code, a configuration-defined trainable set."""

    main_input_name = "pixel_values"
    input_modalities = ("image",)
    _supports_sdpa = True
    # The loss is a mean over each image's valid pixels with non-linear terms (SILog, SSIM), not a sum over items
    # that a count could normalise: Trainer must divide it by the accumulation steps itself rather than hand the
    # model `num_items_in_batch` (which it does for models that claim loss kwargs, e.g. through `**kwargs`).
    accepts_loss_kwargs = False

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        # a local folder is checked first (config, model type, weights): one error naming the file instead of a
        # random model of another type or safetensors' error without a file name
        folder = Path(str(pretrained_model_name_or_path)).expanduser() / kwargs.get("subfolder", "")
        if folder.is_dir():
            check_model_folder(folder, model_types=(cls.config_class.model_type,))
            try:
                check_weights(folder)
            except WeightsFileError as error:
                # the pipeline retries every other model class on OSError/ValueError and reports all of their
                # tracebacks; safetensors' own error type for an unreadable file reaches the caller as it is
                raise SafetensorError(str(error)) from None
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        # loading materialises fresh parameters; restore the configuration's trainable set on them
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True gives a tuple
        model.apply_trainable_mask()
        return loaded

    def save_pretrained(self, save_directory, *args, **kwargs):
        super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True) and getattr(self.config, "auto_map", None):
            # the folder carries the model's code (`auto_map`): the richer depth-estimation pipeline travels with it,
            # config.json names it (`custom_pipelines`)
            custom_object_save(MoADepthCLIPDepthEstimationPipeline, save_directory)

    @property
    def prompt_embeddings(self) -> torch.Tensor:
        return self.semantic_context.prompt_embeddings

    def is_trainable_parameter(self, name: str) -> bool:
        raise NotImplementedError

    def apply_trainable_mask(self):
        """Set `requires_grad` on exactly the parameters the configuration trains (and clear it on the rest)."""
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(self.is_trainable_parameter(name))


class MoADepthCLIPPreTrainedModel(CLIPDepthPreTrainedModel):
    config: MoADepthCLIPConfig
    config_class = MoADepthCLIPConfig
    base_model_prefix = "moa_depthclip"
    supports_gradient_checkpointing = True
    _no_split_modules = ["CLIPEncoderLayer", "MixtureOfAdapters"]

    @torch.no_grad()
    def _init_weights(self, module):
        super()._init_weights(module)
        if isinstance(module, AdapterExperts):
            # zero up-projections: every MoA starts as the identity, so the pretrained CLIP features are intact
            init.zeros_(module.up_proj.weight)
            init.zeros_(module.up_bias)
        elif isinstance(module, GlobalSemanticContext):
            init_prompt_embeddings(module.prompt_embeddings)
            init.constant_(module.logit_scale, math.log(100.0))


def init_prompt_embeddings(prompt_embeddings: torch.Tensor):
    """Placeholder prompts until the conversion writes real CLIP text embeddings; seeded so that every fresh model
    of one configuration agrees."""
    generator = torch.Generator().manual_seed(0)
    random = torch.randn(prompt_embeddings.shape, generator=generator)
    init.copy_(prompt_embeddings, F.normalize(random, dim=-1))


class MoADepthCLIPForDepthEstimation(MoADepthCLIPPreTrainedModel):
    """MoA-DepthCLIP: a CLIP vision tower with Mixture-of-Adapters, a decoder and a hybrid depth head.

    `vision_model` is an unmodified transformers `CLIPVisionModel` (keys `vision_model.*`, as in `CLIPModel`),
    so CLIP weights load into it unchanged. The MoA modules live beside it in `moa` (keyed by block index);
    `encoder` runs the CLIP blocks with them.
    """

    def __init__(self, config: MoADepthCLIPConfig):
        super().__init__(config)
        self.vision_model = CLIPVisionModel(config.vision_config)
        self.semantic_context = GlobalSemanticContext(config)
        experts = config.num_experts > 0
        self.moa = nn.ModuleDict({str(i): MixtureOfAdapters(config) for i in config.moa_layers if experts})
        self.encoder = MoADepthCLIPEncoder(config, self.vision_model, self.moa, self.semantic_context)
        decoder = MultiScaleDepthDecoder if config.decoder == "multiscale" else PatchGridDecoder
        self.decoder = decoder(config)
        self.head = HybridDepthHead(config, self.decoder.out_channels)
        self.depth_loss = DepthLoss(config)
        self.post_init()
        self.apply_trainable_mask()

    def is_trainable_parameter(self, name: str) -> bool:
        """Everything outside the CLIP tower that can change the depth trains; inside it, only the last
        `num_unfrozen_layers` blocks. The semantic context trains only if it guides routers of several experts, and
        the routers only if there are several experts to route to."""
        config = self.config
        if name.startswith("semantic_context."):
            return config.uses_semantic_context
        if ".router." in name and name.startswith("moa."):
            return config.num_experts > 1
        if not name.startswith("vision_model."):
            return True
        return any(
            name.startswith(f"vision_model.encoder.layers.{index}.") for index in self.config.trainable_layer_indices
        )

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
    ) -> MoADepthCLIPDepthEstimatorOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, height, width)`):
            Images normalised by [`MoADepthCLIPImageProcessor`]. Height and width need not be the pretraining
            size: position embeddings are interpolated.
        labels (`torch.FloatTensor` of shape `(batch_size, height, width)`, *optional*):
            Ground-truth depth in metres. Zero, negative, NaN and beyond-`max_depth` pixels are ignored. Any spatial
            size is accepted: the prediction is resized to it for the loss.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        pixel_values = check_pixel_values(pixel_values, self.config.vision_config)

        encoded = self.encoder(pixel_values, output_hidden_states=output_hidden_states)
        features = self.decoder(list(encoded.patch_tokens), encoded.patch_grid, pixel_values)
        head = self.head(features)
        predicted_depth = self.to_input_size(head.depth, pixel_values)
        bin_logits = head.classification.bin_logits if head.classification is not None else None
        loss_output = (
            self.depth_loss(predicted_depth, bin_logits, labels, list(encoded.router_gates))
            if labels is not None
            else None
        )

        depth_uncertainty = None
        if head.classification is not None:
            bins = head.classification
            std = bin_distribution_std(bins.bin_probabilities, bins.bin_centers)
            depth_uncertainty = upsample_to_input(std, pixel_values)

        loss = loss_output.loss if loss_output is not None else None
        if not return_dict:
            output = (predicted_depth,) + ((encoded.hidden_states,) if output_hidden_states else ())
            return ((loss,) + output) if loss is not None else output
        gates = encoded.router_gates
        return MoADepthCLIPDepthEstimatorOutput(
            loss=loss,
            predicted_depth=predicted_depth,
            hidden_states=encoded.hidden_states,
            classification_depth=head.classification.depth if head.classification is not None else None,
            regression_depth=head.regression_depth,
            fusion_weight=head.fusion_weight,
            bin_logits=bin_logits,
            depth_uncertainty=depth_uncertainty,
            router_probs=torch.stack([g.mean(dim=1) for g in gates], dim=1) if gates else None,
            prompt_probs=encoded.prompt_probs,
            router_aux_loss=loss_output.router_aux_loss if loss_output is not None else None,
            loss_components=loss_output.components if loss_output is not None else None,
            valid_label_mask=loss_output.valid_mask if loss_output is not None else None,
        )

    def to_input_size(self, depth: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """The head's depth upsampled bilinearly to the input size, within `[min_depth, max_depth]`."""
        return upsample_to_input(depth, pixel_values).clamp(self.config.min_depth, self.config.max_depth)


__all__ = [
    "CLIPDepthPreTrainedModel",
    "MoADepthCLIPDepthEstimatorOutput",
    "MoADepthCLIPEncoder",
    "MoADepthCLIPForDepthEstimation",
    "MoADepthCLIPPreTrainedModel",
]
