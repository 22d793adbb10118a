"""A CPU fast path for inference: linear layers that run oneDNN on a copy of their weight packed once.

For fp32 on CPU, `F.linear` calls MKL's sgemm, which reorders the weight on every call and stays far below the
machine's matmul rate at the 50 tokens of a ViT-B/32 image. oneDNN on a weight reordered once is faster
(`benchmarks/run.py` measures it) and equal up to fp32 rounding. The kernels are private torch ops
(`torch.ops.mkldnn._reorder_linear_weight`, `torch.ops.mkldnn._linear_pointwise`); where a build lacks them,
`pack_linear_layers` installs nothing and a packed layer falls back to `F.linear`.

Installed the way peft installs adapters: `pack_linear_layers(model)` puts a `PackedLinear` in the place of every
`nn.Linear`, holding the *same* `Parameter` objects (state-dict keys, values and `requires_grad` unchanged), and
`unpack_linear_layers(model)` puts the original layers back. The depth-estimation pipeline installs it when it
runs a float32 model on CPU; nothing in a saved model or config refers to it.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_linear_ops():
    mkldnn = torch.ops.mkldnn
    if not torch.backends.mkldnn.is_available():
        return None
    try:
        return mkldnn._reorder_linear_weight, mkldnn._linear_pointwise
    except (AttributeError, RuntimeError):  # a build without the kernels
        return None


# (reorder, linear) or None; tests set it to None to take the path of a torch build without the private ops
ONEDNN_LINEAR_OPS = _onednn_linear_ops()

# hooks live in these dicts; the wrapper shares them with the layer it replaces, so hooks on either still run
_HOOK_DICTS = (
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_backward_pre_hooks",
    "_backward_hooks",
)


def onednn_linear_available() -> bool:
    return ONEDNN_LINEAR_OPS is not None


class PackedLinear(nn.Linear):
    """Wraps an `nn.Linear`: the same parameters, with gradient-free fp32 CPU calls on a oneDNN-packed weight.

    The packed copy is built on the first eligible call, rebuilt when the weight changes (new storage or an in-place
    update), dropped by `train()` and by `.to()`/`.half()`-like conversions, and never enters the state dict. It
    costs one more copy of the weight in memory. Autograd, training mode, autocast, other dtypes and devices,
    `torch.compile`, `torch.export`, tracing and ONNX export take `F.linear`, as `nn.Linear` does.
    """

    # module -> (weight storage, weight version, packed weight); kept outside the module so that copying or
    # pickling the model never meets oneDNN's opaque tensors
    _packed = weakref.WeakKeyDictionary()

    def __init__(self, base_layer: nn.Linear):
        nn.Module.__init__(self)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.weight = base_layer.weight
        self.bias = base_layer.bias
        self.training = base_layer.training
        for name in _HOOK_DICTS:
            setattr(self, name, getattr(base_layer, name))
        # not a submodule: its parameters are ours already, and its keys must not appear twice
        object.__setattr__(self, "base_layer", base_layer)

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        # compilers and exporters see nn.Linear's own op: checked first, so that tracing meets nothing else here
        if torch.compiler.is_compiling() or torch.jit.is_tracing() or torch.onnx.is_in_onnx_export():
            return F.linear(input, self.weight, self.bias)
        if self._use_packed_weight(input):
            packed = self._packed_weight(input)
            if packed is not None:
                return ONEDNN_LINEAR_OPS[1](input, packed, self.bias, "none", [], "")
        return F.linear(input, self.weight, self.bias)

    def train(self, mode: bool = True):
        if mode:
            PackedLinear._packed.pop(self, None)
        return super().train(mode)

    def _apply(self, fn, recurse=True):
        # .to(), .half(), .cuda() and the like replace the weight: the packed copy would only hold memory
        PackedLinear._packed.pop(self, None)
        return super()._apply(fn, recurse)

    def unwrap(self) -> nn.Linear:
        """The original layer, pointing at this wrapper's current parameters (a conversion may have replaced them)."""
        PackedLinear._packed.pop(self, None)
        base = self.base_layer
        base.weight, base.bias, base.training = self.weight, self.bias, self.training
        return base

    def _use_packed_weight(self, input: torch.Tensor) -> bool:
        return (
            ONEDNN_LINEAR_OPS is not None
            and not self.training
            and not torch.is_grad_enabled()
            and type(input) is torch.Tensor  # not a fake, functional or proxy tensor
            and input.device.type == "cpu"
            and input.dtype == torch.float32
            and not torch.is_autocast_enabled("cpu")  # autocast would run this layer in bf16
            and self.weight.dtype == torch.float32
            and not self.weight.is_inference()  # no version counter to tell when it changes
            and (self.bias is None or self.bias.dtype == torch.float32)
        )

    def _packed_weight(self, input: torch.Tensor):
        weight = self.weight
        key = (weight.data_ptr(), weight._version)
        cached = PackedLinear._packed.get(self)
        if cached is not None and cached[:2] == key:
            return cached[2]
        try:
            # the row count of the first call tunes the packed layout; any row count gives the same result
            packed = ONEDNN_LINEAR_OPS[0](weight.detach(), max(1, input.numel() // input.shape[-1]))
        except RuntimeError:
            packed = None  # a oneDNN build without this kernel: keep F.linear for this weight
        PackedLinear._packed[self] = (*key, packed)
        return packed


def pack_linear_layers(model: nn.Module) -> int:
    """Put a `PackedLinear` in the place of every plain `nn.Linear` inside `model`; returns how many.

    Parameters, state-dict keys and hooks are unchanged. Installs nothing where torch lacks the oneDNN kernels.
    """
    if ONEDNN_LINEAR_OPS is None:
        return 0
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, PackedLinear(child))
                count += 1
    return count


def unpack_linear_layers(model: nn.Module) -> int:
    """Put the original `nn.Linear` back in the place of every `PackedLinear` inside `model`; returns how many."""
    count = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, PackedLinear):
                setattr(parent, name, child.unwrap())
                count += 1
    return count


def is_packed(model: nn.Module) -> bool:
    return any(isinstance(module, PackedLinear) for module in model.modules())


__all__ = ["PackedLinear", "is_packed", "onednn_linear_available", "pack_linear_layers", "unpack_linear_layers"]
