"""`PackedLinear`: gradient-free fp32 CPU inference on oneDNN-packed weights, installed like an adapter."""

import copy
import pickle

import pytest
import torch
from torch import nn

from modeling_moa_depthclip import packed_linear
from modeling_moa_depthclip.packed_linear import (
    PackedLinear,
    is_packed,
    onednn_linear_available,
    pack_linear_layers,
    unpack_linear_layers,
)

from tiny_models import tiny_model


needs_onednn = pytest.mark.skipif(not onednn_linear_available(), reason="this torch build has no oneDNN linear kernel")


def linear_modules(model):
    return [module for module in model.modules() if isinstance(module, nn.Linear)]


def packed_count(model):
    return sum(module in PackedLinear._packed and PackedLinear._packed[module][2] is not None
               for module in linear_modules(model))


def pixels(batch=2, seed=1):
    return torch.randn(batch, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


def pair():
    """The same weights twice: packed and plain `nn.Linear`."""
    plain = tiny_model()
    with torch.no_grad():  # fresh linears have zero biases, which would hide a kernel that dropped them
        for module in linear_modules(plain):
            if module.bias is not None:
                module.bias.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(module.bias.numel()))
    packed = copy.deepcopy(plain)
    pack_linear_layers(packed)
    return packed, plain


def test_a_fresh_model_is_plain_and_nothing_is_saved_about_packing(tmp_path):
    model = tiny_model()
    assert not is_packed(model)
    model.save_pretrained(tmp_path)
    assert "pack" not in (tmp_path / "config.json").read_text()


@needs_onednn
def test_packing_wraps_the_same_parameters_and_keeps_keys_and_hooks():
    model = tiny_model()
    fc1 = model.vision_model.encoder.layers[0].mlp.fc1
    calls = []
    fc1.register_forward_hook(lambda module, args, output: calls.append(output.shape))
    parameters = dict(model.named_parameters())
    state = model.state_dict()
    count = pack_linear_layers(model)
    assert count == len(linear_modules(model)) > 0
    assert all(type(module) is PackedLinear for module in linear_modules(model))
    packed_parameters = dict(model.named_parameters())
    assert packed_parameters.keys() == parameters.keys()
    assert all(packed_parameters[name] is parameter for name, parameter in parameters.items())  # shared, not copied
    assert [p.requires_grad for p in packed_parameters.values()] == [p.requires_grad for p in parameters.values()]
    assert model.state_dict().keys() == state.keys()
    with torch.no_grad():
        model(pixel_values=pixels())
    assert len(calls) == 1  # a hook on the wrapped layer still runs
    assert unpack_linear_layers(model) == count
    assert model.vision_model.encoder.layers[0].mlp.fc1 is fc1 and fc1.weight is parameters[
        "vision_model.encoder.layers.0.mlp.fc1.weight"]
    assert not is_packed(model)


@needs_onednn
def test_inference_runs_the_packed_kernel_and_matches_nn_linear():
    packed, plain = pair()
    x = pixels()
    with torch.inference_mode():
        expected = plain(pixel_values=x).predicted_depth
        got = packed(pixel_values=x).predicted_depth
    assert packed_count(packed) == len(linear_modules(packed))
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

        other = tiny_model(seed=7)
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
    prefix = packed.encoder.frozen_prefix_length()
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
    unpack_linear_layers(packed)  # the restored layers hold the converted weights
    assert all(m.weight.dtype == torch.bfloat16 for m in linear_modules(packed))


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
            # the copy's wrappers share the copy's parameters, not the original's
            fc1 = model.vision_model.encoder.layers[0].mlp.fc1
            assert fc1.base_layer.weight is fc1.weight
            assert fc1.weight is not packed.vision_model.encoder.layers[0].mlp.fc1.weight


def test_without_the_private_ops_nothing_is_installed_and_packed_layers_fall_back(monkeypatch):
    model = tiny_model()
    installed = copy.deepcopy(model)
    pack_linear_layers(installed)  # installed where the ops exist; a no-op otherwise
    monkeypatch.setattr(packed_linear, "ONEDNN_LINEAR_OPS", None)
    assert not onednn_linear_available()
    bare = copy.deepcopy(model)
    assert pack_linear_layers(bare) == 0 and not is_packed(bare)
    x = pixels()
    with torch.no_grad():
        expected = model(pixel_values=x).predicted_depth
        torch.testing.assert_close(installed(pixel_values=x).predicted_depth, expected, rtol=0, atol=0)
    assert packed_count(installed) == 0


def test_a_kernel_that_refuses_a_weight_leaves_that_layer_on_f_linear(monkeypatch):
    def refuse(weight, rows):
        raise RuntimeError("no kernel for this layout")

    def fail_if_called(*args):
        raise AssertionError("the packed kernel ran without a packed weight")

    monkeypatch.setattr(packed_linear, "ONEDNN_LINEAR_OPS", (refuse, fail_if_called))
    model = tiny_model()
    packed = copy.deepcopy(model)
    assert pack_linear_layers(packed) == len(linear_modules(packed))
    x = pixels()
    with torch.no_grad():
        torch.testing.assert_close(packed(pixel_values=x).predicted_depth, model(pixel_values=x).predicted_depth,
                                   rtol=0, atol=0)
    assert all(PackedLinear._packed[m][2] is None for m in linear_modules(packed))


def test_old_configs_with_the_packing_switch_still_load(tmp_path):
    import json

    from modeling_moa_depthclip import MoADepthCLIPForDepthEstimation

    tiny_model().save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["pack_weights_for_cpu_inference"] = True  # as 0.1.0 saved every model
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = MoADepthCLIPForDepthEstimation.from_pretrained(tmp_path)
    assert not is_packed(model) and not hasattr(model.config, "pack_weights_for_cpu_inference")
