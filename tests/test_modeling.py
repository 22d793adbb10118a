import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForDepthEstimation, CLIPVisionModel

from modeling_moa_depthclip import MoADepthCLIPConfig, MoADepthCLIPForDepthEstimation
from modeling_moa_depthclip.modeling_moa_depthclip import depth_bin_centers, depth_bin_edges
from tiny_models import tiny_config, tiny_model

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("decoder", ["multiscale", "paper"])
def test_forward_gives_metric_depth_at_the_input_size(decoder):
    model = tiny_model(decoder=decoder)
    pixels = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        out = model(pixels)
    config = model.config
    assert out.predicted_depth.shape == (2, 64, 96)
    assert out.predicted_depth.min() >= config.min_depth and out.predicted_depth.max() <= config.max_depth
    grid = out.bin_logits.shape[-2:]
    if decoder == "multiscale":
        assert tuple(grid) == (16, 24)  # a quarter of the input
    else:
        assert tuple(grid) == (4, 6)  # the 16-pixel patch grid
    assert out.bin_logits.shape[1] == config.num_depth_bins
    for branch in (out.classification_depth, out.regression_depth):
        assert branch.shape == (2, *grid)
        assert branch.min() >= config.min_depth - 1e-5 and branch.max() <= config.max_depth + 1e-5
    assert ((out.fusion_weight > 0) & (out.fusion_weight < 1)).all()
    # the fused depth is the per-pixel convex combination of the branches
    fused = out.fusion_weight * out.classification_depth + (1 - out.fusion_weight) * out.regression_depth
    assert torch.allclose(torch.nn.functional.interpolate(fused[:, None], size=(64, 96), mode="bilinear")[:, 0],
                          out.predicted_depth, atol=1e-5)
    assert out.router_probs.shape == (2, 2, config.num_experts)
    assert torch.allclose(out.router_probs.sum(-1), torch.ones(2, 2))
    assert out.prompt_probs.shape == (2, len(config.depth_prompts))


def test_default_vit_b32_multiscale_predicts_at_a_quarter_and_paper_on_the_7x7_grid():
    with torch.device("meta"):
        multiscale = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig())
    assert multiscale.decoder.level_channels == [128, 64, 32, 32]
    model = tiny_model(vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                          num_attention_heads=2, image_size=64, patch_size=32, projection_dim=32))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 224, 224))
    assert tuple(out.bin_logits.shape[-2:]) == (56, 56)
    paper = tiny_model(decoder="paper", vision_config=dict(hidden_size=64, intermediate_size=128,
                                                           num_hidden_layers=4, num_attention_heads=2,
                                                           image_size=64, patch_size=32, projection_dim=32))
    with torch.no_grad():
        out = paper(torch.randn(1, 3, 224, 224))
    assert tuple(out.bin_logits.shape[-2:]) == (7, 7)


def test_bins_span_the_depth_range():
    for spacing in ("linear", "log"):
        config = tiny_config(bin_spacing=spacing)
        edges, centers = depth_bin_edges(config), depth_bin_centers(config)
        assert edges.shape == (17,) and centers.shape == (16,)
        assert edges[0].item() == pytest.approx(config.min_depth) and edges[-1].item() == pytest.approx(10.0)
        assert ((centers > edges[:-1]) & (centers < edges[1:])).all()


def test_clip_weights_and_keys_are_untouched_by_the_adapters():
    model = tiny_model()
    clip = CLIPVisionModel(model.config.vision_config)
    clip_keys = set(clip.state_dict())
    model_clip_keys = {k[len("vision_model."):] for k in model.state_dict() if k.startswith("vision_model.")}
    assert model_clip_keys == clip_keys
    # CLIP weights load under the one prefix, strictly
    missing, unexpected = model.load_state_dict(
        {f"vision_model.{k}": v for k, v in clip.state_dict().items()}, strict=False
    )
    assert not unexpected and all(not k.startswith("vision_model.") for k in missing)


def test_fresh_adapters_are_the_identity_so_clip_features_pass_through():
    torch.manual_seed(0)
    model = MoADepthCLIPForDepthEstimation(tiny_config()).eval()
    clip = CLIPVisionModel(model.config.vision_config).eval()
    clip.load_state_dict({k[len("vision_model."):]: v for k, v in model.state_dict().items()
                          if k.startswith("vision_model.")})
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ours = model(pixels, output_hidden_states=True).hidden_states
        reference = clip(pixels, output_hidden_states=True).hidden_states
    assert len(ours) == len(reference) == 5
    for a, b in zip(ours, reference):
        assert torch.allclose(a, b, atol=1e-5)
    # with non-zero adapters the MoA blocks' outputs change, the blocks before them do not
    perturbed = tiny_model()
    perturbed.load_state_dict(model.state_dict() | {k: v for k, v in perturbed.state_dict().items() if "up_" in k})
    with torch.no_grad():
        adapted = perturbed(pixels, output_hidden_states=True).hidden_states
    assert torch.allclose(adapted[1], reference[1], atol=1e-5)
    assert not torch.allclose(adapted[2], reference[2], atol=1e-4)


def test_router_is_guided_by_the_prompt_context():
    model = tiny_model()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        before = model(pixels)
        model.semantic_context.prompt_embeddings.copy_(torch.nn.functional.normalize(
            torch.randn_like(model.prompt_embeddings), dim=-1))
        after = model(pixels)
    assert not torch.allclose(before.router_probs, after.router_probs, atol=1e-5)
    assert not torch.allclose(before.prompt_probs, after.prompt_probs, atol=1e-5)


def test_topk_router_keeps_k_experts_per_token():
    model = tiny_model(router_type="topk", router_top_k=2, num_experts=4)
    hidden = torch.randn(2, 17, 64)
    context = torch.randn(2, 16)
    gates = model.moa["1"].router(hidden, context)
    assert ((gates > 0).sum(-1) == 2).all()
    assert torch.allclose(gates.sum(-1), torch.ones(2, 17))


def test_gradients_reach_exactly_the_trainable_parameters():
    model = tiny_model().train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters()
                         if not n.startswith("vision_model.") or n.startswith("vision_model.encoder.layers.3.")}
    out = model(torch.randn(2, 3, 64, 64), labels=1.0 + 3.0 * torch.rand(2, 64, 64))
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert with_grad == trainable
    assert model.num_parameters(only_trainable=True) == sum(p.numel() for n, p in model.named_parameters()
                                                            if n in trainable)


def test_blocks_before_the_first_trainable_parameter_build_no_autograd_graph():
    model = tiny_model().train()  # MoA after blocks 1 and 3: blocks 0 and 1 need no graph
    records = {}
    for index, layer in enumerate(model.vision_model.encoder.layers):
        layer.register_forward_hook(lambda m, i, o, index=index: records.__setitem__(index, o.requires_grad))
    model(torch.randn(1, 3, 64, 64), labels=torch.rand(1, 64, 64) + 1).loss.backward()
    assert records == {0: False, 1: False, 2: True, 3: True}
    for parameter in model.parameters():
        parameter.requires_grad_(True)  # full fine-tuning: everything needs the graph
    model(torch.randn(1, 3, 64, 64))
    assert records[0] is True


def test_loss_is_the_weighted_sum_of_its_parts_and_ignores_invalid_pixels():
    model = tiny_model(router_aux_loss_coef=0.5)
    pixels = torch.randn(2, 3, 64, 64)
    labels = 1.0 + 3.0 * torch.rand(2, 64, 64)
    labels[:, :10] = 0.0
    labels[:, 10:12] = float("nan")
    labels[:, 12:14] = 50.0
    with torch.no_grad():
        out = model(pixels, labels=labels)
        parts = out.loss_components
        weights = model.config.loss_weights
        expected = sum(weights[k] * parts[k] for k in weights) + 0.5 * parts["router_aux"]
        assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
        assert torch.isfinite(out.loss)
        other = labels.clone()
        other[:, :14] = -1.0  # different invalid values, same valid pixels
        assert model(pixels, labels=other).loss.item() == pytest.approx(out.loss.item(), rel=1e-5)
        # labels at another resolution are compared with the prediction resized to them
        assert torch.isfinite(model(pixels, labels=labels[:, ::2, ::2]).loss)
    # the output says which label pixels were supervised: not the 0, NaN or beyond-range rows
    expected_mask = torch.ones(2, 64, 64, dtype=torch.bool)
    expected_mask[:, :14] = False
    assert torch.equal(out.valid_label_mask, expected_mask)
    assert model(pixels).valid_label_mask is None


def test_labels_that_cannot_match_name_both_shapes():
    model = tiny_model()
    with pytest.raises(ValueError, match=r"\(3, 64, 64\).*\(2, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64), labels=torch.rand(3, 64, 64))
    with pytest.raises(ValueError, match=r"\(2, 2, 64, 64\)"):
        model(torch.randn(2, 3, 64, 64), labels=torch.rand(2, 2, 64, 64))


def test_bad_pixel_values_get_one_clear_error():
    model = tiny_model()
    with pytest.raises(ValueError, match="4 channels"):
        model(torch.randn(1, 4, 64, 64))
    with pytest.raises(ValueError, match="multiples of the patch size 16"):
        model(torch.randn(1, 3, 64, 70))
    with pytest.raises(ValueError, match=r"\(batch, channels, height, width\)"):
        model(torch.randn(3, 64, 64))


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model().train()
    pixels, labels = torch.randn(2, 3, 64, 64), 1.0 + torch.rand(2, 64, 64)
    model(pixels, labels=labels).loss.backward()
    reference = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    model.activation_checkpointing_enable()
    assert model.vision_model.encoder.layers[3].gradient_checkpointing
    model(pixels, labels=labels).loss.backward()
    for name, grad in reference.items():
        assert torch.allclose(model.get_parameter(name).grad, grad, atol=1e-5), name


def test_bf16_on_cpu_is_close_to_fp32():
    model = tiny_model()
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = model(pixels).predicted_depth
        low = model.to(torch.bfloat16)(pixels.to(torch.bfloat16))
    assert torch.isfinite(low.predicted_depth).all()
    assert (low.predicted_depth.float() - reference).abs().mean() < 0.05 * reference.mean()
    model.train()
    loss = model(pixels.to(torch.bfloat16), labels=1.0 + torch.rand(2, 64, 64)).loss
    loss.backward()
    assert torch.isfinite(loss)


def test_return_dict_false_gives_a_tuple():
    model = tiny_model()
    with torch.no_grad():
        depth, = model(torch.randn(1, 3, 64, 64), return_dict=False)
        loss, depth_2 = model(torch.randn(1, 3, 64, 64), labels=torch.rand(1, 64, 64) + 1, return_dict=False)
    assert depth.shape == depth_2.shape == (1, 64, 64) and loss.dim() == 0


def test_save_and_load_reproduce_outputs_prompts_and_the_trainable_set(tmp_path):
    model = tiny_model()
    with torch.no_grad():
        model.semantic_context.prompt_embeddings.copy_(torch.nn.functional.normalize(
            torch.randn_like(model.prompt_embeddings), dim=-1))
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = AutoModelForDepthEstimation.from_pretrained(tmp_path).eval()
    assert type(loaded) is MoADepthCLIPForDepthEstimation
    assert torch.equal(loaded.prompt_embeddings, model.prompt_embeddings)
    pixels = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(loaded(pixels).predicted_depth, model(pixels).predicted_depth)
    assert loaded.num_parameters(only_trainable=True) == model.num_parameters(only_trainable=True)
    assert {n for n, p in loaded.named_parameters() if p.requires_grad} == {
        n for n, p in model.named_parameters() if p.requires_grad}
    with_info, info = MoADepthCLIPForDepthEstimation.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert with_info.num_parameters(only_trainable=True) == model.num_parameters(only_trainable=True)


def _readme_figure(label):
    text = (REPO / "README.md").read_text()
    match = re.search(rf"\| {re.escape(label)} \|\s*([\d,]+)\s*\|\s*([\d,]+)", text)
    assert match, f"README.md has no parameter row for {label!r}"
    return int(match.group(1).replace(",", "")), int(match.group(2).replace(",", ""))


@pytest.mark.parametrize("decoder, label", [("multiscale", "default (`multiscale`)"), ("paper", "`paper`")])
def test_full_vit_b32_parameter_counts_match_the_readme(decoder, label):
    with torch.device("meta"):
        model = MoADepthCLIPForDepthEstimation(MoADepthCLIPConfig(decoder=decoder))
        clip = CLIPVisionModel(MoADepthCLIPConfig().vision_config)
    trainable, total = model.num_parameters(only_trainable=True), model.num_parameters()
    clip_total = clip.num_parameters()
    assert 87_000_000 < clip_total < 88_000_000  # CLIP ViT-B/32 vision tower
    block = sum(p.numel() for p in clip.encoder.layers[0].parameters())
    own = total - clip_total
    assert trainable == 4 * block + own  # last four blocks plus everything that is not CLIP
    assert _readme_figure(label) == (trainable, total)


def test_frozen_blocks_after_the_first_adapter_are_recomputed_with_identical_gradients():
    pixels, labels = torch.randn(2, 3, 64, 64), 1.0 + torch.rand(2, 64, 64)
    grads, calls = {}, {}
    for recompute in (False, True):
        model = tiny_model(checkpoint_frozen_layers=recompute).train()  # block 2: frozen, between MoA 1 and 3
        counter = [0]
        model.vision_model.encoder.layers[2].register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
        model(pixels, labels=labels).loss.backward()
        grads[recompute] = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
        calls[recompute] = counter[0]
    assert calls == {False: 1, True: 2}  # recomputed once in backward
    assert grads[True].keys() == grads[False].keys()
    for name, grad in grads[False].items():
        assert torch.allclose(grads[True][name], grad, atol=1e-6), name


# every tensor of a tiny model outside the CLIP tower, in the layout checkpoints have always been saved with
SAVED_LAYOUT = [
    "semantic_context.logit_scale", "semantic_context.prompt_embeddings", "semantic_context.image_projection.weight",
    "semantic_context.fuse.0.weight", "semantic_context.fuse.0.bias",
    *[f"moa.{i}.{name}" for i in (1, 3) for name in (
        "router.token_proj.weight", "router.token_proj.bias", "router.context_proj.weight", "router.gate.weight",
        "router.gate.bias", "experts.up_bias", "experts.down_proj.weight", "experts.down_proj.bias",
        "experts.up_proj.weight")],
    *[f"decoder.reassemble.{part}.{i}.{p}" for part in ("norms", "projections") for i in (0, 1) for p in ("weight", "bias")],
    *[f"decoder.detail_stem.conv{i}.{p}" for i in (1, 2) for p in ("weight", "bias")],
    *[f"decoder.fusion.transitions.{i}.{p}" for i in (0, 1) for p in ("weight", "bias")],
    *[f"decoder.fusion.refine.{i}.conv{j}.{p}" for i in (0, 1, 2) for j in (1, 2) for p in ("weight", "bias")],
    *[f"head.{branch}.{p}" for branch in ("bin_classifier", "regressor", "fusion_gate") for p in ("weight", "bias")],
]  # fmt: skip


def test_the_encoder_and_heads_keep_the_saved_key_layout():
    model = tiny_model()
    assert [k for k in model.state_dict() if not k.startswith("vision_model.")] == SAVED_LAYOUT
    # the encoder runs the model's CLIP tower and MoA modules without registering them a second time
    assert not any(k.startswith("encoder.") for k in model.state_dict())
    assert model.encoder.vision_model is model.vision_model and model.encoder.moa is model.moa
    assert list(model.encoder.parameters()) == []


def test_the_encoder_hands_the_decoder_the_adapted_tokens_of_the_moa_blocks():
    model = tiny_model()
    with torch.no_grad():
        encoded = model.encoder(torch.randn(2, 3, 64, 96), output_hidden_states=True)
    assert encoded.patch_grid == (4, 6) and len(encoded.patch_tokens) == len(model.config.moa_layers) == 2
    assert all(tokens.shape == (2, 24, 64) for tokens in encoded.patch_tokens)
    assert torch.equal(encoded.patch_tokens[-1], encoded.last_hidden_state[:, 1:])  # MoA after the last block
    assert len(encoded.router_gates) == 2 and encoded.router_gates[0].shape == (2, 25, 4)
    assert encoded.prompt_probs.shape == (2, 7) and len(encoded.hidden_states) == 5


def test_heads_return_named_outputs_with_the_bin_distribution():
    model = tiny_model()
    features = torch.randn(2, model.decoder.out_channels, 5, 7)
    with torch.no_grad():
        out = model.head(features)
        bins = model.head.bin_classifier(features)
    assert torch.equal(out.classification.depth, bins.depth)
    assert bins.bin_probabilities.shape == (2, 16, 5, 7) and bins.bin_centers.shape == (16,)
    torch.testing.assert_close(bins.bin_probabilities.sum(dim=1), torch.ones(2, 5, 7))
    torch.testing.assert_close(bins.depth, torch.einsum("bkhw,k->bhw", bins.bin_probabilities, bins.bin_centers))
    # what a per-pixel spread of the bin distribution needs, in metres
    spread = (bins.bin_probabilities * (bins.bin_centers[:, None, None] - bins.depth[:, None]) ** 2).sum(1).sqrt()
    assert spread.shape == (2, 5, 7) and bool((spread >= 0).all())
    weight = out.fusion_weight
    torch.testing.assert_close(out.depth, weight * out.classification.depth + (1 - weight) * out.regression_depth)
    for head, present in (("classification", "classification"), ("regression", "regression_depth")):
        ablated = tiny_model(head=head)
        with torch.no_grad():
            single = ablated.head(features)
        assert single.fusion_weight is None and ablated.head.fusion_gate is None
        assert (single.classification is None) == (head == "regression")
        assert (single.regression_depth is None) == (head == "classification")
        branch = single.classification.depth if head == "classification" else single.regression_depth
        assert torch.equal(single.depth, branch) and getattr(single, present) is not None


def test_by_default_frozen_blocks_keep_their_activations_instead_of_recomputing():
    # at the default batch the recomputation costs more time than the activations it saves cost memory
    model = tiny_model().train()
    counter = [0]
    model.vision_model.encoder.layers[2].register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    model(torch.randn(2, 3, 64, 64), labels=1.0 + torch.rand(2, 64, 64)).loss.backward()
    assert counter[0] == 1
