"""Tests for modeling_moa_depthclip/clip/checkpoints.py on tiny, randomly initialised OpenAI-layout CLIPs.

No pretrained weights are available offline, so parity is checked against a reference forward
pass written directly from the OpenAI layout below, independent of the converter.
"""

import copy
import math
import os
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import CLIPModel, CLIPVisionModel

# tests/ and conversion/ are not installed packages; import from the repository root.

from modeling_moa_depthclip.clip.checkpoints import (  # noqa: E402
    OPENAI_CLIP_TOKENIZER,
    TorchScriptNotTrustedError,
    TorchScriptReadError,
    detect_layout,
    load_clip_source,
    openai_to_hf_clip,
    read_torchscript_state_dict,
    vision_state_dict,
)
from modeling_moa_depthclip.clip import checkpoints as clip_checkpoints  # noqa: E402

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),  # tracing MultiheadAttention
]

# OpenAI derives heads as width // 64, so width 128 gives 2 heads of dim 64.
V_WIDTH, V_LAYERS, PATCH, IMAGE = 128, 2, 8, 32
T_WIDTH, T_LAYERS, VOCAB, CTX = 128, 2, 100, 16
EMBED = 32
HEADS = 2
EOT = VOCAB - 1
SOT = VOCAB - 2


def make_openai_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale):
        return torch.randn(*shape, generator=g) * scale

    def ln(sd, name, width):
        # Non-trivial affine parameters so a swapped/missed LayerNorm would be detected.
        sd[f"{name}.weight"] = 1 + rand(width, scale=0.1)
        sd[f"{name}.bias"] = rand(width, scale=0.1)

    def blocks(sd, prefix, width, layers):
        for i in range(layers):
            p = f"{prefix}.{i}"
            sd[f"{p}.attn.in_proj_weight"] = rand(3 * width, width, scale=width**-0.5)
            sd[f"{p}.attn.in_proj_bias"] = rand(3 * width, scale=0.1)
            sd[f"{p}.attn.out_proj.weight"] = rand(width, width, scale=width**-0.5)
            sd[f"{p}.attn.out_proj.bias"] = rand(width, scale=0.1)
            ln(sd, f"{p}.ln_1", width)
            sd[f"{p}.mlp.c_fc.weight"] = rand(4 * width, width, scale=width**-0.5)
            sd[f"{p}.mlp.c_fc.bias"] = rand(4 * width, scale=0.1)
            sd[f"{p}.mlp.c_proj.weight"] = rand(width, 4 * width, scale=(4 * width) ** -0.5)
            sd[f"{p}.mlp.c_proj.bias"] = rand(width, scale=0.1)
            ln(sd, f"{p}.ln_2", width)

    sd: dict[str, torch.Tensor] = {}
    grid = IMAGE // PATCH
    sd["visual.class_embedding"] = rand(V_WIDTH, scale=V_WIDTH**-0.5)
    sd["visual.conv1.weight"] = rand(V_WIDTH, 3, PATCH, PATCH, scale=(3 * PATCH * PATCH) ** -0.5)
    sd["visual.positional_embedding"] = rand(grid * grid + 1, V_WIDTH, scale=0.5)
    ln(sd, "visual.ln_pre", V_WIDTH)
    blocks(sd, "visual.transformer.resblocks", V_WIDTH, V_LAYERS)
    ln(sd, "visual.ln_post", V_WIDTH)
    sd["visual.proj"] = rand(V_WIDTH, EMBED, scale=V_WIDTH**-0.5)
    sd["token_embedding.weight"] = rand(VOCAB, T_WIDTH, scale=0.5)
    sd["positional_embedding"] = rand(CTX, T_WIDTH, scale=0.5)
    blocks(sd, "transformer.resblocks", T_WIDTH, T_LAYERS)
    ln(sd, "ln_final", T_WIDTH)
    sd["text_projection"] = rand(T_WIDTH, EMBED, scale=T_WIDTH**-0.5)
    sd["logit_scale"] = torch.tensor(math.log(1 / 0.07))
    return sd


# ---------------------------------------------------------------- reference (OpenAI layout)


def _ln(sd, name, x):
    return F.layer_norm(x, x.shape[-1:], sd[f"{name}.weight"], sd[f"{name}.bias"], eps=1e-5)


def _block(sd, p, x, attn_mask=None):
    width = x.shape[-1]
    h = _ln(sd, f"{p}.ln_1", x).transpose(0, 1)  # multi_head_attention_forward wants (L, N, E)
    attn, _ = F.multi_head_attention_forward(
        h, h, h, width, HEADS,
        sd[f"{p}.attn.in_proj_weight"], sd[f"{p}.attn.in_proj_bias"], None, None, False, 0.0,
        sd[f"{p}.attn.out_proj.weight"], sd[f"{p}.attn.out_proj.bias"],
        training=False, need_weights=False, attn_mask=attn_mask,
    )  # fmt: skip
    x = x + attn.transpose(0, 1)
    h = F.linear(_ln(sd, f"{p}.ln_2", x), sd[f"{p}.mlp.c_fc.weight"], sd[f"{p}.mlp.c_fc.bias"])
    h = h * torch.sigmoid(1.702 * h)  # QuickGELU
    return x + F.linear(h, sd[f"{p}.mlp.c_proj.weight"], sd[f"{p}.mlp.c_proj.bias"])


def reference_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    cls = sd["visual.class_embedding"].expand(x.shape[0], 1, -1)
    x = torch.cat([cls, x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(sd, "visual.ln_pre", x)
    states = [x]
    for i in range(V_LAYERS):
        x = _block(sd, f"visual.transformer.resblocks.{i}", x)
        states.append(x)
    return states, _ln(sd, "visual.ln_post", x[:, 0]) @ sd["visual.proj"]


def reference_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"][: ids.shape[1]]
    causal = torch.full((ids.shape[1], ids.shape[1]), float("-inf")).triu(1)
    for i in range(T_LAYERS):
        x = _block(sd, f"transformer.resblocks.{i}", x, attn_mask=causal)
    x = _ln(sd, "ln_final", x)
    return x[torch.arange(ids.shape[0]), ids.argmax(dim=-1)] @ sd["text_projection"]


def make_tokens(seed=1, batch=4):
    g = torch.Generator().manual_seed(seed)
    ids = torch.zeros(batch, CTX, dtype=torch.long)  # OpenAI pads with 0 after EOT
    for b in range(batch):
        n = int(torch.randint(1, CTX - 1, (1,), generator=g))
        ids[b, 0] = SOT
        ids[b, 1 : n + 1] = torch.randint(1, SOT, (n,), generator=g)
        ids[b, n + 1] = EOT
    return ids


# ---------------------------------------------------------------- fixtures / helpers


@pytest.fixture(scope="module")
def openai_sd():
    return make_openai_state_dict()


@pytest.fixture(scope="module")
def converted(openai_sd):
    return openai_to_hf_clip(openai_sd)


def assert_same_state(a, b):
    assert sorted(a) == sorted(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


_METADATA = {"dtype", "architectures", "transformers_version", "_name_or_path"}


def assert_same_architecture(a, b):
    def strip(d):
        return {k: strip(v) if isinstance(v, dict) else v for k, v in d.items() if k not in _METADATA}

    assert strip(a.to_dict()) == strip(b.to_dict())


def clip_model(sd, config):
    model = CLIPModel(copy.deepcopy(config)).eval()  # save_pretrained mutates its config
    model.load_state_dict(sd, strict=True)
    return model


class _Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def scripted_holder(sd):
    """A TorchScript module whose state_dict() is `sd`, like OpenAI's released .pt archives."""
    root = _Holder()
    for key, value in sd.items():
        *path, leaf = key.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, _Holder())
            module = module._modules[part]
        module.register_parameter(leaf, torch.nn.Parameter(value.clone()))
    root.not_state = torch.ones(3)  # plain tensor attribute: not part of state_dict()
    return torch.jit.script(root)


# ---------------------------------------------------------------- conversion


def test_inferred_config(converted):
    _, config = converted
    v, t = config.vision_config, config.text_config
    assert (v.hidden_size, v.num_hidden_layers, v.num_attention_heads) == (V_WIDTH, V_LAYERS, HEADS)
    assert (v.patch_size, v.image_size, v.intermediate_size, v.num_channels) == (PATCH, IMAGE, 4 * V_WIDTH, 3)
    assert (t.vocab_size, t.max_position_embeddings, t.hidden_size) == (VOCAB, CTX, T_WIDTH)
    assert (t.num_hidden_layers, t.num_attention_heads, t.intermediate_size) == (T_LAYERS, HEADS, 4 * T_WIDTH)
    assert config.projection_dim == v.projection_dim == t.projection_dim == EMBED
    assert t.eos_token_id == EOT and v.hidden_act == t.hidden_act == "quick_gelu"
    assert v.layer_norm_eps == t.layer_norm_eps == 1e-5


def test_in_proj_split_order_and_transposes(openai_sd, converted):
    sd, _ = converted
    fused = openai_sd["visual.transformer.resblocks.1.attn.in_proj_weight"]
    for i, name in enumerate("qkv"):
        w = sd[f"vision_model.encoder.layers.1.self_attn.{name}_proj.weight"]
        assert torch.equal(w, fused[i * V_WIDTH : (i + 1) * V_WIDTH])
    assert torch.equal(sd["visual_projection.weight"], openai_sd["visual.proj"].t())
    assert torch.equal(sd["text_projection.weight"], openai_sd["text_projection"].t())
    save_file(sd, os.devnull)  # split/transposed tensors must not share storage


@pytest.mark.parametrize("attn_implementation", ["eager", "sdpa"])
def test_vision_parity_every_layer(openai_sd, converted, attn_implementation):
    sd, config = converted
    vision_sd, projection = vision_state_dict(sd)
    vision = CLIPVisionModel(config.vision_config).eval()
    vision.load_state_dict(vision_sd, strict=True)
    vision.set_attn_implementation(attn_implementation)

    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(2))
    ref_states, ref_embeds = reference_image(openai_sd, pixels)
    with torch.no_grad():
        out = vision(pixel_values=pixels, output_hidden_states=True)
        image_embeds = clip_model(sd, config).get_image_features(pixel_values=pixels).pooler_output

    assert len(out.hidden_states) == len(ref_states) == V_LAYERS + 1
    for i, (ours, ref) in enumerate(zip(out.hidden_states, ref_states)):
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-5, msg=f"hidden state {i}")
    torch.testing.assert_close(out.pooler_output @ projection.t(), ref_embeds, rtol=0, atol=1e-5)
    torch.testing.assert_close(image_embeds, ref_embeds, rtol=0, atol=1e-5)


def test_text_parity(openai_sd, converted):
    sd, config = converted
    ids = make_tokens()
    assert (ids.argmax(-1) == (ids == EOT).int().argmax(-1)).all()  # EOT is the largest id
    with torch.no_grad():
        ours = clip_model(sd, config).get_text_features(input_ids=ids).pooler_output
    torch.testing.assert_close(ours, reference_text(openai_sd, ids), rtol=0, atol=1e-5)


def test_vision_state_dict_matches_clip_vision_model(converted):
    sd, config = converted
    vision_sd, projection = vision_state_dict(sd)
    assert sorted(vision_sd) == sorted(CLIPVisionModel(config.vision_config).state_dict())
    assert projection.shape == (EMBED, V_WIDTH)


@pytest.mark.parametrize(
    "key",
    ["visual.transformer.resblocks.1.attn.in_proj_bias", "ln_final.weight", "visual.proj"],
)
def test_missing_tensor_is_named(openai_sd, key):
    broken = {k: v for k, v in openai_sd.items() if k != key}
    with pytest.raises(ValueError, match="missing") as err:
        openai_to_hf_clip(broken)
    assert key in str(err.value)


def test_extra_tensor_is_named(openai_sd):
    extra = dict(openai_sd, **{"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(V_WIDTH)})
    with pytest.raises(ValueError, match="unexpected") as err:
        openai_to_hf_clip(extra)
    assert "visual.transformer.resblocks.0.ls_1.gamma" in str(err.value)


def test_wrong_shape_is_reported(openai_sd):
    bad = dict(openai_sd, **{"visual.ln_pre.bias": torch.zeros(V_WIDTH + 1)})
    with pytest.raises(ValueError, match=r"vision_model\.pre_layrnorm\.bias"):
        openai_to_hf_clip(bad)


def test_known_buffers_are_ignored_and_metadata_checked(openai_sd, converted):
    with_buffers = dict(openai_sd, attn_mask=torch.zeros(CTX, CTX), input_resolution=torch.tensor(IMAGE),
                        context_length=torch.tensor(CTX), vocab_size=torch.tensor(VOCAB))  # fmt: skip
    assert_same_state(openai_to_hf_clip(with_buffers)[0], converted[0])
    with pytest.raises(ValueError, match="input_resolution"):
        openai_to_hf_clip(dict(openai_sd, input_resolution=torch.tensor(224)))


def test_missing_logit_scale_warns_and_uses_default(openai_sd):
    sd = {k: v for k, v in openai_sd.items() if k != "logit_scale"}
    with pytest.warns(UserWarning, match="logit_scale"):
        out, config = openai_to_hf_clip(sd)
    assert out["logit_scale"].item() == pytest.approx(config.logit_scale_init_value)


def test_detect_layout(openai_sd, converted):
    assert detect_layout(openai_sd) == "openai"
    assert detect_layout(converted[0]) == "hf"
    assert detect_layout({f"module.{k}": v for k, v in openai_sd.items()}) == "open_clip"
    assert detect_layout({"epoch": 3, "state_dict": openai_sd}) == "open_clip"
    assert detect_layout(dict(openai_sd, attn_mask=torch.zeros(CTX, CTX))) == "open_clip"
    custom_text = {(k if k.startswith(("visual.", "logit")) else f"text.{k}"): v for k, v in openai_sd.items()}
    assert detect_layout(custom_text) == "open_clip"
    assert_same_state(openai_to_hf_clip(custom_text)[0], converted[0])
    with pytest.raises(ValueError, match="ResNet"):
        detect_layout({"visual.layer1.0.conv1.weight": torch.ones(1)})
    with pytest.raises(ValueError, match="unrecognised"):
        detect_layout({"encoder.weight": torch.ones(1)})


def test_heads_override_for_non_64_multiple(openai_sd):
    # Re-use the tensors but claim 4 heads: the config must follow the override.
    _, config = openai_to_hf_clip(openai_sd, vision_heads=4, text_heads=4)
    assert config.vision_config.num_attention_heads == config.text_config.num_attention_heads == 4


# ---------------------------------------------------------------- sources


def test_load_hf_folder(tmp_path, converted):
    sd, config = converted
    clip_model(sd, config).save_pretrained(tmp_path / "hf")
    loaded, loaded_config, hint = load_clip_source(tmp_path / "hf")
    assert_same_state(loaded, sd)
    assert_same_architecture(loaded_config, config)
    assert hint is None  # no tokenizer files saved and not the standard CLIP vocabulary


def test_incomplete_hf_folder_is_refused(tmp_path, converted):
    sd, config = converted
    clip_model(sd, config).save_pretrained(tmp_path / "hf")
    weights = tmp_path / "hf" / "model.safetensors"
    tensors = load_file(weights)
    del tensors["vision_model.post_layernorm.bias"]
    save_file(tensors, weights, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"vision_model\.post_layernorm\.bias"):
        load_clip_source(tmp_path / "hf")


def test_load_openai_pt(tmp_path, openai_sd, converted):
    torch.save(openai_sd, tmp_path / "ViT-tiny.pt")
    sd, config, hint = load_clip_source(tmp_path / "ViT-tiny.pt")
    assert_same_state(sd, converted[0])
    assert_same_architecture(config, converted[1])
    assert hint is None


def test_load_open_clip_safetensors_with_module_prefix(tmp_path, openai_sd, converted):
    save_file({f"module.{k}": v for k, v in openai_sd.items()}, tmp_path / "open_clip.safetensors")
    sd, _, _ = load_clip_source(tmp_path / "open_clip.safetensors")
    assert_same_state(sd, converted[0])


def test_load_open_clip_bin_training_checkpoint(tmp_path, openai_sd, converted):
    inner = {f"module.{k}": v for k, v in openai_sd.items()}
    inner["module.attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)
    checkpoint = {"epoch": 5, "name": "ViT-B-32-quickgelu", "state_dict": inner,
                  "optimizer": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}}  # fmt: skip
    torch.save(checkpoint, tmp_path / "epoch_5.bin")
    sd, _, _ = load_clip_source(tmp_path / "epoch_5.bin")
    assert_same_state(sd, converted[0])


def test_load_loose_hf_layout_file(tmp_path, converted):
    sd, config = converted
    save_file(sd, tmp_path / "model.safetensors")
    with pytest.warns(UserWarning, match="inferring"):
        loaded, inferred, _ = load_clip_source(tmp_path / "model.safetensors")
    assert_same_state(loaded, sd)
    assert_same_architecture(inferred, config)
    # A CLIP config.json beside the weights wins over inference (heads are not in the shapes).
    saved = copy.deepcopy(config)
    saved.vision_config.num_attention_heads = 4
    saved.save_pretrained(tmp_path)
    assert load_clip_source(tmp_path / "model.safetensors")[1].vision_config.num_attention_heads == 4


def test_torchscript_archive_read_without_running_code(tmp_path, openai_sd, converted):
    path = tmp_path / "ViT-tiny-jit.pt"
    scripted_holder(openai_sd).save(str(path))

    code_free = read_torchscript_state_dict(path)
    assert_same_state(code_free, dict(torch.jit.load(str(path), map_location="cpu").state_dict()))

    for trust in (False, True):
        sd, _, _ = load_clip_source(path, trust_torchscript=trust)
        assert_same_state(sd, converted[0])


class _StandardModules(torch.nn.Module):
    """Stock layers, mixed dtypes, buffers and a plain tensor attribute, as in real archives."""

    def __init__(self):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(8, 2)
        self.ln = torch.nn.LayerNorm(8)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8, bias=False))
        self.conv = torch.nn.Conv2d(3, 8, 2, 2, bias=False).half()
        self.register_buffer("mask", torch.ones(4, 4).triu(1), persistent=False)
        self.register_buffer("input_resolution", torch.tensor(32))
        self.scale = torch.nn.Parameter(torch.ones([], dtype=torch.bfloat16))
        self.plain = torch.zeros(2)

    def forward(self, x):
        h = self.ln(x)
        return x + self.attn(h, h, h, need_weights=False)[0] + self.mlp(h)


@pytest.mark.parametrize("export", ["script", "trace"])
def test_code_free_reader_matches_jit_load(tmp_path, export):
    module = _StandardModules().eval()
    exported = torch.jit.script(module) if export == "script" else torch.jit.trace(module, torch.randn(4, 1, 8))
    exported.save(str(tmp_path / "m.pt"))
    expected = torch.jit.load(str(tmp_path / "m.pt"), map_location="cpu").state_dict()
    got = read_torchscript_state_dict(tmp_path / "m.pt")
    assert list(got) == list(expected)
    for k in expected:
        assert got[k].dtype == expected[k].dtype, k
    assert_same_state(got, dict(expected))


def test_torchscript_fallback_needs_trust(tmp_path, openai_sd, converted, monkeypatch):
    path = tmp_path / "ViT-tiny-jit.pt"
    scripted_holder(openai_sd).save(str(path))

    def refuse(_path):
        raise TorchScriptReadError("simulated unsupported archive")

    monkeypatch.setattr(clip_checkpoints, "read_torchscript_state_dict", refuse)
    with pytest.raises(TorchScriptNotTrustedError, match="trust_torchscript=True"):
        load_clip_source(path)
    sd, _, _ = load_clip_source(path, trust_torchscript=True)  # via torch.jit.load
    assert_same_state(sd, converted[0])


class _Payload:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return os.makedirs, (self.target,)


def test_malicious_torchscript_is_not_executed(tmp_path):
    target = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("evil/data.pkl", pickle.dumps(_Payload(str(target)), protocol=2))
        zf.writestr("evil/constants.pkl", pickle.dumps((), protocol=2))
        zf.writestr("evil/code/__torch__.py", "class M(Module):\n  __parameters__ = []\n")
        zf.writestr("evil/version", "3\n")
    with pytest.raises(TorchScriptNotTrustedError, match="refusing to load global"):
        load_clip_source(path)
    assert not target.exists()


def test_missing_file_is_named(tmp_path):
    for missing in (tmp_path / "nope.pt", "./nope", "dir/ViT-B-32.safetensors"):
        with pytest.raises(FileNotFoundError, match=str(missing).replace(".", r"\.")):
            load_clip_source(missing)


def test_tokenizer_hint_for_standard_vocab():
    config = openai_to_hf_clip(make_openai_state_dict())[1]
    config.text_config.vocab_size = 49408
    assert clip_checkpoints._tokenizer_hint(config) == OPENAI_CLIP_TOKENIZER


def test_unsupported_suffix(tmp_path):
    path = tmp_path / "weights.npz"
    path.write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported"):
        load_clip_source(path)
