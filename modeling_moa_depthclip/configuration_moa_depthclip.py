"""MoA-DepthCLIP model configuration."""

import json
from pathlib import Path

from transformers import CLIPVisionConfig, PreTrainedConfig
from transformers.dynamic_module_utils import TRANSFORMERS_DYNAMIC_MODULE_NAME


# DepthCLIP's prompt set (Zhang et al., 2022): "This {object} is {depth word}", one prompt per depth word.
DEPTHCLIP_DEPTH_WORDS = [
    "giant",
    "extremely close",
    "close",
    "not in distance",
    "a little remote",
    "far",
    "unseen",
]
DEPTHCLIP_PROMPTS = [f"This object is {word}" for word in DEPTHCLIP_DEPTH_WORDS]

# OpenAI CLIP ViT-B/32 vision tower, exactly as `openai/clip-vit-base-patch32` ships it.
CLIP_VIT_B32_VISION = dict(
    hidden_size=768,
    intermediate_size=3072,
    projection_dim=512,
    num_hidden_layers=12,
    num_attention_heads=12,
    num_channels=3,
    image_size=224,
    patch_size=32,
    hidden_act="quick_gelu",
    layer_norm_eps=1e-5,
    attention_dropout=0.0,
    initializer_range=0.02,
    initializer_factor=1.0,
)

DEFAULT_LOSS_WEIGHTS = {
    "bin_ce": 0.1,
    "l1": 0.1,
    "silog": 1.0,
    "gradient": 0.5,
    "ssim": 0.2,
}

# Written into every saved config.json: with `trust_remote_code=True`, `pipeline("depth-estimation", model=folder)`
# then builds the richer pipeline from the folder's own copy of pipeline_moa_depthclip.py. Without remote code the
# package's config drops it, so transformers' stock pipeline serves the task as for any depth model.
CUSTOM_PIPELINES = {
    "depth-estimation": {
        "impl": "pipeline_moa_depthclip.MoADepthCLIPDepthEstimationPipeline",
        "pt": ["AutoModelForDepthEstimation"],
        "type": "image",
    }
}
# True in the copy of this file that transformers loads from a saved folder as remote code
LOADED_AS_REMOTE_CODE = __name__.startswith(TRANSFORMERS_DYNAMIC_MODULE_NAME + ".")

DECODERS = ("multiscale", "paper")
HEADS = ("hybrid", "classification", "regression")
ROUTER_TYPES = ("soft", "topk")
BIN_SPACINGS = ("linear", "log")
ROUTER_AUX_LOSSES = ("balance", "entropy")


class MoADepthCLIPConfig(PreTrainedConfig):
    r"""
    Configuration of [`MoADepthCLIPForDepthEstimation`].

    Args:
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            The CLIP vision tower. Defaults to OpenAI CLIP ViT-B/32.
        moa_layers (`list[int]`, *optional*, defaults to `[2, 5, 8, 11]`):
            Encoder blocks after whose output a Mixture-of-Adapters is applied. Their adapted patch tokens feed the
            decoder.
        num_unfrozen_layers (`int`, *optional*, defaults to 4):
            How many of the last encoder blocks are trained; every other CLIP weight stays frozen.
        num_experts (`int`, *optional*, defaults to 4):
            Adapter experts per MoA module. 1 is a single adapter per block (the authors' prototype: the router and
            the semantic context then have no effect and are not trained); 0 applies no adapter at all, the blocks
            of `moa_layers` only hand their tokens to the decoder.
        adapter_bottleneck (`int`, *optional*, defaults to 64): Hidden width of each expert.
        router_hidden_size (`int`, *optional*, defaults to 128): Hidden width of the per-token router.
        router_type (`str`, *optional*, defaults to `"soft"`):
            `"soft"` mixes all experts by the softmax gate; `"topk"` keeps the `router_top_k` largest gates,
            renormalised.
        router_top_k (`int`, *optional*, defaults to 2): Experts kept per token when `router_type="topk"`.
        prompt_guided_router (`bool`, *optional*, defaults to `True`):
            Whether each router also sees the image's global semantic context. `False` routes every token by itself
            alone (the routers have no `context_proj`, the semantic context is not computed or trained).
        router_aux_loss (`str`, *optional*, defaults to `"balance"`):
            Auxiliary router loss: `"balance"` (Switch-Transformer load balancing) or `"entropy"` (mean per-token
            gate entropy, pushing towards confident routing).
        router_aux_loss_coef (`float`, *optional*, defaults to 0.0):
            Weight of the auxiliary router loss in the total loss (0 disables it, as in the authors' prototype).
        depth_prompts (`list[str]`, *optional*): Text prompts whose CLIP text embeddings form the global semantic
            context. Defaults to the seven DepthCLIP prompts.
        prompt_embedding_dim (`int`, *optional*):
            Width of the prompt text embeddings (CLIP's projection dim). Defaults to `vision_config.projection_dim`.
        context_dim (`int`, *optional*, defaults to 128): Width of the context vector handed to each router.
        num_depth_bins (`int`, *optional*, defaults to 128): Depth bins of the classification branch.
        min_depth (`float`, *optional*, defaults to 1e-3): Smallest predicted depth, metres.
        max_depth (`float`, *optional*, defaults to 10.0): Largest predicted depth, metres.
        bin_spacing (`str`, *optional*, defaults to `"log"`): `"linear"` or `"log"` spacing of the bin centres.
        decoder (`str`, *optional*, defaults to `"multiscale"`):
            `"multiscale"` fuses the MoA layers' features with an RGB detail stem and predicts at a quarter of the
            input resolution; `"paper"` predicts on the ViT patch grid (7x7 at 224x224) and upsamples.
        decoder_hidden_size (`int`, *optional*, defaults to 128): Channels of the multi-scale decoder.
        head (`str`, *optional*, defaults to `"hybrid"`):
            `"hybrid"` fuses depth-bin classification and regression per pixel; `"classification"` and
            `"regression"` keep one branch. (DepthCLIP's zero-shot baseline is its own model: `DepthCLIPConfig`.)
        loss_weights (`dict[str, float]`, *optional*): Weights of `bin_ce`, `l1`, `silog`, `gradient`, `ssim`.
        silog_lambda (`float`, *optional*, defaults to 0.85): Variance focus of the SILog loss.
        checkpoint_frozen_layers (`bool`, *optional*, defaults to `False`):
            In training, recompute the frozen CLIP blocks that lie after the first trainable module (they only pass
            gradients back to the adapters before them) in the backward pass instead of storing their activations.
            Same gradients, less memory, one extra forward through those blocks: at batch 8 and 224x224 it saves
            about 75 MiB and costs about 30% of the step (BENCHMARKS.md, section 4b); worth it for large batches
            or inputs.
    """

    model_type = "moa_depthclip"
    sub_configs = {"vision_config": CLIPVisionConfig}
    # Trainer.evaluate/predict keep only `predicted_depth` (what depth metrics need) of the model's outputs: the
    # per-bin logits alone would be num_depth_bins floats per output pixel
    keys_to_ignore_at_inference = [
        "hidden_states",
        "attentions",
        "classification_depth",
        "regression_depth",
        "fusion_weight",
        "bin_logits",
        "depth_uncertainty",
        "router_probs",
        "prompt_probs",
        "router_aux_loss",
        "loss_components",
        "valid_label_mask",
    ]

    def __init__(
        self,
        vision_config=None,
        moa_layers=None,
        num_unfrozen_layers=None,
        num_experts=4,
        adapter_bottleneck=64,
        router_hidden_size=128,
        router_type="soft",
        router_top_k=2,
        prompt_guided_router=True,
        router_aux_loss="balance",
        router_aux_loss_coef=0.0,
        depth_prompts=None,
        prompt_embedding_dim=None,
        context_dim=128,
        num_depth_bins=128,
        min_depth=1e-3,
        max_depth=10.0,
        bin_spacing="log",
        decoder="multiscale",
        decoder_hidden_size=128,
        head="hybrid",
        loss_weights=None,
        silog_lambda=0.85,
        checkpoint_frozen_layers=False,
        initializer_range=0.02,
        **kwargs,
    ):
        self.vision_config = vision_config = vision_config_from(vision_config)
        self.head = head
        self.moa_layers = list(moa_layers) if moa_layers is not None else [2, 5, 8, 11]
        self.num_unfrozen_layers = num_unfrozen_layers if num_unfrozen_layers is not None else 4
        self.num_experts = num_experts
        self.adapter_bottleneck = adapter_bottleneck
        self.router_hidden_size = router_hidden_size
        self.router_type = router_type
        self.router_top_k = router_top_k
        self.prompt_guided_router = bool(prompt_guided_router)
        self.router_aux_loss = router_aux_loss
        self.router_aux_loss_coef = router_aux_loss_coef
        self.depth_prompts = list(depth_prompts) if depth_prompts is not None else list(DEPTHCLIP_PROMPTS)
        self.prompt_embedding_dim = (
            prompt_embedding_dim if prompt_embedding_dim is not None else vision_config.projection_dim
        )
        self.context_dim = context_dim
        self.num_depth_bins = num_depth_bins
        self.min_depth = float(min_depth)
        self.max_depth = float(max_depth)
        self.bin_spacing = bin_spacing
        self.decoder = decoder
        self.decoder_hidden_size = decoder_hidden_size
        self.loss_weights = {**DEFAULT_LOSS_WEIGHTS, **(loss_weights or {})}
        self.silog_lambda = silog_lambda
        self.checkpoint_frozen_layers = bool(checkpoint_frozen_layers)
        self.initializer_range = initializer_range
        # configs saved by 0.1.0 carry this machine-specific switch; the CPU fast path is now the pipeline's choice
        kwargs.pop("pack_weights_for_cpu_inference", None)
        # transformers runs a config's `custom_pipelines` only with trust_remote_code=True (and refuses the task
        # without it): only the remote-code copy claims it, elsewhere the stock depth-estimation pipeline serves
        custom_pipelines = kwargs.pop("custom_pipelines", None)
        super().__init__(**kwargs)
        if LOADED_AS_REMOTE_CODE and custom_pipelines:
            self.custom_pipelines = custom_pipelines
        self.validate_moa_config()

    def validate_moa_config(self):
        """Raise a `ValueError` naming the field and its allowed range for any value the model cannot be built with."""
        num_layers = self.vision_config.num_hidden_layers
        _check_choice("head", self.head, HEADS)
        if not self.moa_layers:
            raise ValueError("moa_layers must name at least one encoder block, got an empty list")
        for index in self.moa_layers:
            if not isinstance(index, int) or isinstance(index, bool) or not 0 <= index < num_layers:
                raise ValueError(
                    f"moa_layers contains {index!r}; every entry must be an int in [0, {num_layers - 1}] "
                    f"(the vision tower has {num_layers} blocks)"
                )
        if len(set(self.moa_layers)) != len(self.moa_layers):
            raise ValueError(f"moa_layers must not repeat a block, got {self.moa_layers}")
        if sorted(self.moa_layers) != self.moa_layers:
            raise ValueError(f"moa_layers must be in increasing order, got {self.moa_layers}")
        _check_int("num_unfrozen_layers", self.num_unfrozen_layers, 0, num_layers)
        _check_int("num_experts", self.num_experts, 0, None)
        _check_int("adapter_bottleneck", self.adapter_bottleneck, 1, None)
        _check_int("router_hidden_size", self.router_hidden_size, 1, None)
        _check_int("context_dim", self.context_dim, 1, None)
        _check_int("prompt_embedding_dim", self.prompt_embedding_dim, 1, None)
        _check_int("num_depth_bins", self.num_depth_bins, 2, None)
        _check_int("decoder_hidden_size", self.decoder_hidden_size, 8, None)
        _check_choice("router_type", self.router_type, ROUTER_TYPES)
        _check_choice("router_aux_loss", self.router_aux_loss, ROUTER_AUX_LOSSES)
        _check_choice("bin_spacing", self.bin_spacing, BIN_SPACINGS)
        _check_choice("decoder", self.decoder, DECODERS)
        if self.router_type == "topk" and self.num_experts > 0:
            _check_int("router_top_k", self.router_top_k, 1, self.num_experts)
        if self.router_aux_loss_coef < 0:
            raise ValueError(f"router_aux_loss_coef must be >= 0, got {self.router_aux_loss_coef}")
        if not self.depth_prompts or not all(isinstance(p, str) and p.strip() for p in self.depth_prompts):
            raise ValueError("depth_prompts must be a non-empty list of non-empty strings")
        validate_depth_range(self.min_depth, self.max_depth)
        if self.decoder_hidden_size % 8:
            raise ValueError(f"decoder_hidden_size must be a multiple of 8, got {self.decoder_hidden_size}")
        validate_loss_settings(self.loss_weights, self.silog_lambda)

    def to_dict(self):
        output = super().to_dict()
        output["custom_pipelines"] = CUSTOM_PIPELINES
        return output

    @property
    def uses_semantic_context(self) -> bool:
        """Whether the global semantic context can change the depth (it feeds routers that mix several experts)."""
        return self.num_experts > 1 and self.prompt_guided_router

    @property
    def trainable_layer_indices(self) -> list[int]:
        num_layers = self.vision_config.num_hidden_layers
        return list(range(num_layers - self.num_unfrozen_layers, num_layers))


# configurations known by name; any other name is a JSON file (`configs_dir/NAME.json` or a path)
NAMED_CONFIGS = {"default": {}, "paper": {"decoder": "paper"}}


def config_from_name(name: str, configs_dir=None) -> MoADepthCLIPConfig:
    """'default' (ViT-B/32, multi-scale decoder), 'paper' (the patch-grid decoder), `configs_dir/NAME.json`
    (e.g. `examples/configs/tiny.json` for 'tiny') or the path of a JSON file of `MoADepthCLIPConfig` fields
    (keys starting with `_comment` are skipped)."""
    if name in NAMED_CONFIGS:
        return MoADepthCLIPConfig(**NAMED_CONFIGS[name])
    path = Path(configs_dir) / f"{name}.json" if configs_dir is not None else None
    if path is None or not path.is_file():
        path = Path(name).expanduser()
    known = list(NAMED_CONFIGS) + sorted(p.stem for p in Path(configs_dir).glob("*.json")) if configs_dir else []
    if not path.is_file():
        raise ValueError(f"config {name!r} is neither one of {known or list(NAMED_CONFIGS)} nor a JSON file")
    try:
        settings = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"config file {path} is not valid JSON: {error}") from None
    settings = {k: v for k, v in settings.items() if not k.startswith("_comment")}
    settings.pop("model_type", None)
    try:
        return MoADepthCLIPConfig(**settings)
    except (TypeError, ValueError) as error:
        raise ValueError(f"config file {path}: {error}") from None



def vision_config_from(vision_config) -> CLIPVisionConfig:
    """A `CLIPVisionConfig` from a config or a dict of fields (unset ones: OpenAI CLIP ViT-B/32's)."""
    if vision_config is None:
        return CLIPVisionConfig(**CLIP_VIT_B32_VISION)
    if isinstance(vision_config, dict):
        return CLIPVisionConfig(**{**CLIP_VIT_B32_VISION, **vision_config})
    if not isinstance(vision_config, CLIPVisionConfig):
        raise ValueError(f"vision_config must be a dict or a CLIPVisionConfig, got {type(vision_config).__name__}")
    return vision_config


def validate_depth_range(min_depth: float, max_depth: float):
    if not min_depth > 0:
        raise ValueError(f"min_depth must be > 0 metres, got {min_depth}")
    if not min_depth < max_depth:
        raise ValueError(f"min_depth must be < max_depth, got min_depth={min_depth} and max_depth={max_depth}")


def validate_loss_settings(loss_weights: dict, silog_lambda: float):
    unknown = set(loss_weights) - set(DEFAULT_LOSS_WEIGHTS)
    if unknown:
        raise ValueError(f"loss_weights has unknown terms {sorted(unknown)}; allowed: {sorted(DEFAULT_LOSS_WEIGHTS)}")
    for name, weight in loss_weights.items():
        if not weight >= 0:
            raise ValueError(f"loss_weights[{name!r}] must be >= 0, got {weight}")
    if not 0 <= silog_lambda <= 1:
        raise ValueError(f"silog_lambda must be in [0, 1], got {silog_lambda}")


def _check_int(name, value, low, high):
    if not isinstance(value, int) or isinstance(value, bool) or value < low or (high is not None and value > high):
        allowed = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must be an int in {allowed}, got {value!r}")


def _check_choice(name, value, choices):
    if value not in choices:
        raise ValueError(f"{name} must be one of {list(choices)}, got {value!r}")


__all__ = ["MoADepthCLIPConfig", "DEPTHCLIP_PROMPTS", "config_from_name"]
