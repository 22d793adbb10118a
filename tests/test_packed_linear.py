"""`PackedLinear`: gradient-free fp32 CPU inference on oneDNN-packed weights, equal to `nn.Linear` up to rounding."""

import copy
import pickle

import pytest
import torch
from torch import nn

from modeling_moa_depthclip.modeling_moa_depthclip import _ONEDNN_LINEAR_AVAILABLE, PackedLinear

from tiny_models import tiny_model


needs_onednn = pytest.mark.skipif(not _ONEDNN_LINEAR_AVAILABLE, reason="this torch build has no oneDNN linear kernel")


def linear_modules(model):
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def packed_count(model):
    return sum(module in PackedLinear._packed for module in linear_modules(model))


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def pair():
    """The same weights twice: packed (the default) and plain `nn.Linear`."""
    packed = tiny_model()
    with torch.no_grad():  # fresh linears have zero biases, which would hide a kernel that dropped them
        for module in linear_modules(packed):
            if module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(module.bias.numel()))
    plain = tiny_model(pack_weights_for_cpu_inference=False)
    plain.load_state_dict(packed.state_dict())
    return packed, plain


def test_every_linear_is_packed_by_default_and_none_when_disabled():
    packed, plain = pair()
    assert all(type(module) is PackedLinear for module in linear_modules(packed))
    assert all(type(module) is nn.Linear for module in linear_modules(plain))
    # keys and values are those of nn.Linear: checkpoints move freely between the two
    assert packed.state_dict().keys() == plain.state_dict().keys()


@needs_onednn
def test_inference_runs_the_packed_kernel_and_matches_nn_linear():
    packed, plain = pair()
    x = pixels()
    with torch.inference_mode():
        expected = plain(pixel_values=x).predicted_depth
        got = packed(pixel_values=x).predicted_depth
    assert packed_count(packed) == len(linear_modules(packed))
    assert packed_count(plain) == 0
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    # a batch size other than the one the weights were packed for
    with torch.no_grad():
        torch.testing.assert_close(
            packed(pixel_values=pixels(batch=5)).predicted_depth, plain(pixel_values=pixels(batch=5)).predicted_depth,
            rtol=1e-5, atol=1e-5,
        )


@needs_onednn
def test_a_changed_weight_is_repacked():
    packed, plain = pair()
    x = pixels()
    with torch.no_grad():
        before = packed(pixel_values=x).predicted_depth
        for model in (packed, plain):  # an in-place update, as an optimizer or load_state_dict makes
            model.vision_model.encoder.layers[0].mlp.fc1.weight.mul_(-3.0)
        after = packed(pixel_values=x).predicted_depth
        torch.testing.assert_close(after, plain(pixel_values=x).predicted_depth, rtol=1e-5, atol=1e-5)
        assert not torch.allclose(before, after, atol=1e-4)

        other = tiny_model(seed=7, pack_weights_for_cpu_inference=False)
        packed.load_state_dict(other.state_dict())
        torch.testing.assert_close(
            packed(pixel_values=x).predicted_depth, other(pixel_values=x).predicted_depth, rtol=1e-5, atol=1e-5
        )


@needs_onednn
def test_training_and_autograd_take_nn_linear_path_with_identical_gradients():
    packed, plain = pair()
    x = pixels()
    labels = torch.full((2, 64, 64), 2.5)
    with torch.no_grad():
        packed(pixel_values=x)  # packs every weight
    assert packed_count(packed) == len(linear_modules(packed))
    packed.train(), plain.train()
    assert packed_count(packed) == 0  # train() drops the packed copies
    packed(pixel_values=x, labels=labels).loss.backward()
    plain(pixel_values=x, labels=labels).loss.backward()
    assert packed_count(packed) == 0
    for (name, a), (_, b) in zip(packed.named_parameters(), plain.named_parameters()):
        assert (a.grad is None) == (b.grad is None), name
        if a.grad is not None:
            assert torch.equal(a.grad, b.grad), name
    # eval mode with autograd on (e.g. attribution methods): only the frozen prefix, which runs without a graph,
    # takes the packed path
    packed.eval()
    packed(pixel_values=x).predicted_depth.sum().backward()
    prefix = packed._frozen_prefix_length()
    assert prefix > 0
    in_prefix = {m for layer in packed.vision_model.encoder.layers[:prefix] for m in linear_modules(layer)}
    assert {m for m in linear_modules(packed) if m in PackedLinear._packed} == in_prefix


@needs_onednn
def test_bf16_and_dtype_changes_fall_back_and_free_the_packed_copies():
    packed, _ = pair()
    with torch.no_grad():
        packed(pixel_values=pixels())
        assert packed_count(packed) > 0
        packed.to(torch.bfloat16)
        assert packed_count(packed) == 0
        depth = packed(pixel_values=pixels().to(torch.bfloat16)).predicted_depth
    assert torch.isfinite(depth).all() and packed_count(packed) == 0


@needs_onednn
def test_autocast_keeps_its_bf16_matmuls():
    packed, plain = pair()
    x = pixels()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        got = packed(pixel_values=x, output_hidden_states=True).hidden_states[-1]
        expected = plain(pixel_values=x, output_hidden_states=True).hidden_states[-1]
    assert packed_count(packed) == 0
    assert torch.equal(got, expected)


@needs_onednn
def test_a_packed_model_can_be_copied_and_pickled():
    packed, plain = pair()
    x = pixels()
    with torch.no_grad():
        packed(pixel_values=x)
        clone = copy.deepcopy(packed)
        restored = pickle.loads(pickle.dumps(packed))
        expected = plain(pixel_values=x).predicted_depth
        for model in (clone, restored):
            assert all(type(module) is PackedLinear for module in linear_modules(model))
            torch.testing.assert_close(model(pixel_values=x).predicted_depth, expected, rtol=1e-5, atol=1e-5)


def test_from_pretrained_can_turn_packing_off(tmp_path):
    from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation

    tiny_model().save_pretrained(tmp_path)
    assert all(
        type(m) is PackedLinear for m in linear_modules(MoADepthCLIPForDepthEstimation.from_pretrained(tmp_path))
    )
    plain = MoADepthCLIPForDepthEstimation.from_pretrained(tmp_path, pack_weights_for_cpu_inference=False)
    assert plain.config.pack_weights_for_cpu_inference is False
    assert all(type(m) is nn.Linear for m in linear_modules(plain))
