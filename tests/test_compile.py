"""torch.compile and torch.export see one graph of the model."""

import pytest
import torch

from tiny_models import tiny_model


@pytest.fixture(scope="module")
def model():
    return tiny_model()


def test_fullgraph_compile_matches_eager(model):
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    torch._dynamo.reset()
    # aot_eager runs dynamo's capture (where graph breaks happen) and AOT autograd without inductor's C++ build
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.inference_mode():
        expected = model(pixel_values=x).predicted_depth
        got = compiled(pixel_values=x).predicted_depth
        again = compiled(pixel_values=x + 0.1).predicted_depth  # no recompilation trouble on new values
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    assert again.shape == expected.shape and not torch.equal(again, got)


def test_export_holds_plain_linear_ops(model):
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    exported = torch.export.export(model, (), {"pixel_values": x})
    targets = {str(node.target) for node in exported.graph.nodes if node.op == "call_function"}
    assert any("linear" in target for target in targets)
    with torch.no_grad():
        torch.testing.assert_close(
            exported.module()(pixel_values=x).predicted_depth, model(pixel_values=x).predicted_depth, rtol=1e-5,
            atol=1e-5,
        )
