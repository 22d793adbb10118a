"""torch.compile and torch.export see one graph, with or without the CPU fast path installed."""

import copy

import pytest
import torch

from modeling_moa_depthclip.packed_linear import PackedLinear, pack_linear_layers

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def models():
    plain = tiny_model()
    packed = copy.deepcopy(plain)
    pack_linear_layers(packed)
    return plain, packed


def test_fullgraph_compile_matches_eager(models):
    # the packed model is the default one with every nn.Linear wrapped: one run checks both
    plain, model = models
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    # aot_eager runs dynamo's capture (where graph breaks happen) and AOT autograd without inductor's C++ build
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    PackedLinear._packed.clear()
    with torch.inference_mode():
        expected = plain(pixel_values=x).predicted_depth
        got = compiled(pixel_values=x).predicted_depth
        again = compiled(pixel_values=x + 0.1).predicted_depth  # no recompilation trouble on new values
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert again.shape == expected.shape and not torch.equal(again, got)
    assert not any(PackedLinear._packed.get(m) for m in model.modules())  # the packed kernel stepped aside


def test_export_of_a_packed_model_holds_plain_linear_ops(models):
    plain, packed = models
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    exported = torch.export.export(packed, (), {"pixel_values": x})
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert not any("mkldnn" in target for target in targets)
    assert any("linear" in target for target in targets)
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(pixel_values=x).predicted_depth, plain(pixel_values=x).predicted_depth, rtol=1e-5,
            atol=1e-5,
        )
