"""conversion/convert_clip_to_moa_depthclip.py on tiny, randomly initialised CLIPs in every source form.

Vision parity is checked against the reference forward pass written from the OpenAI layout in
test_clip_checkpoints.py (independent of both converters); prompt embeddings against an independent text
forward pass (OpenAI layout) or `CLIPModel.get_text_features` (HF folders).
"""

import json

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import metadata_load
from safetensors.torch import load_file, save_file
from transformers import AutoModelForDepthEstimation, CLIPConfig, CLIPModel, CLIPTokenizer


from conversion.common import build_config  # noqa: E402
from conversion.convert_clip_to_moa_depthclip import main  # noqa: E402
from modeling_moa_depthclip import DEPTHCLIP_PROMPTS, MoADepthCLIPForDepthEstimation  # noqa: E402
from test_clip_checkpoints import (  # noqa: E402
    CTX,
    IMAGE,
    T_WIDTH,
    V_LAYERS,
    make_openai_state_dict,
    reference_image,
    reference_text,
    scripted_holder,
)

pytestmark = [
    pytest.mark.filterwarnings("ignore:`torch.jit.*is deprecated:DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
]

# the tiny OpenAI-layout CLIP has 2 vision blocks: one MoA after each, the last block trainable
TINY_MOA_ARGS = ["--moa_layers", "0", "1", "--num_unfrozen_layers", "1", "--image_size", str(IMAGE), str(IMAGE)]
CODE_FILES = {"configuration_moa_depthclip.py", "modeling_moa_depthclip.py", "image_processing_moa_depthclip.py"}


# ---------------------------------------------------------------- a tiny CLIP tokenizer, built here


def make_clip_tokenizer(texts, filler: int = 0) -> CLIPTokenizer:
    """A real CLIP BPE tokenizer over the words of `texts`: letters, letter</w>, one merge chain per word.

    `<|startoftext|>` and `<|endoftext|>` are the last two ids, as in OpenAI's vocabulary (the OpenAI text
    tower pools at the largest id). `filler` unused tokens pad the vocabulary before them.
    """
    words = sorted({word for text in texts for word in text.lower().split()})
    vocab, merges = {}, []

    def add(token):
        vocab.setdefault(token, len(vocab))

    for char in sorted(set("".join(words))):
        add(char)
        add(char + "</w>")
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            if current + piece not in vocab:
                merges.append((current, piece))
                add(current + piece)
            current += piece
    for index in range(filler):
        add(f"<|unused{index}|>")
    add("<|startoftext|>")
    add("<|endoftext|>")
    return CLIPTokenizer(vocab=vocab, merges=merges)


def tiny_clip_config(tokenizer: CLIPTokenizer, vision_config: dict, projection_dim: int, text_hidden_size: int = 32,
                     text_layers: int = 2) -> CLIPConfig:
    """A tiny `CLIPConfig` whose text tower fits `tokenizer` (start/end of text are its last two ids)."""
    vocab = len(tokenizer)
    return CLIPConfig(
        text_config=dict(vocab_size=vocab, hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
                         num_hidden_layers=text_layers, num_attention_heads=2, max_position_embeddings=16,
                         bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1),
        vision_config=vision_config, projection_dim=projection_dim,
    )  # fmt: skip


PROMPT_TEXTS = DEPTHCLIP_PROMPTS + ["near wall", "far window"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tokenizer")
    make_clip_tokenizer(PROMPT_TEXTS).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    return CLIPTokenizer.from_pretrained(tokenizer_dir)


def openai_state_dict_for(tokenizer, seed: int = 0) -> dict[str, torch.Tensor]:
    """The tiny OpenAI-layout CLIP of test_clip_checkpoints.py with a text vocabulary that fits `tokenizer`."""
    sd = make_openai_state_dict(seed)
    g = torch.Generator().manual_seed(seed + 100)
    sd["token_embedding.weight"] = torch.randn(len(tokenizer), T_WIDTH, generator=g) * 0.5
    return sd


@pytest.fixture(scope="module")
def openai_sd(tokenizer):
    return openai_state_dict_for(tokenizer)


@pytest.fixture(scope="module")
def openai_pt(openai_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("openai") / "ViT-tiny.pt"
    torch.save(openai_sd, path)
    return path


def run(args, capsys):
    """main(args) -> (exit code, stdout, stderr)."""
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def converted_openai(openai_pt, tokenizer_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "tiny-moa"
    assert main([
        "--clip_model", str(openai_pt), "--output_dir", str(output), "--tokenizer", str(tokenizer_dir), *TINY_MOA_ARGS
    ]) == 0  # fmt: skip
    return output


def pixels(batch=2, size=IMAGE, seed=2):
    return torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(seed))


# ---------------------------------------------------------------- OpenAI layout: parity


def test_vision_tower_parity_every_layer(converted_openai, openai_sd):
    model = AutoModelForDepthEstimation.from_pretrained(converted_openai).eval()
    assert isinstance(model, MoADepthCLIPForDepthEstimation)
    # fresh adapters are the identity: their up-projections are zero
    for moa in model.moa.values():
        assert not moa.experts.up_proj.weight.any() and not moa.experts.up_bias.any()

    x = pixels()
    reference_states, reference_embeds = reference_image(openai_sd, x)
    with torch.no_grad():
        hidden_states = model(pixel_values=x, output_hidden_states=True).hidden_states
        embeds = model.semantic_context.image_projection(model.vision_model.post_layernorm(hidden_states[-1][:, 0]))
    assert len(hidden_states) == len(reference_states) == V_LAYERS + 1
    for index, (ours, reference) in enumerate(zip(hidden_states, reference_states)):
        torch.testing.assert_close(ours, reference, rtol=0, atol=1e-5, msg=f"hidden state {index}")
    torch.testing.assert_close(embeds, reference_embeds, rtol=0, atol=1e-5)


def test_prompt_embeddings_are_the_normalised_text_features(converted_openai, openai_sd, tokenizer):
    model = AutoModelForDepthEstimation.from_pretrained(converted_openai)
    assert model.config.depth_prompts == DEPTHCLIP_PROMPTS
    ids = tokenizer(DEPTHCLIP_PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    assert ids.shape[1] <= CTX
    expected = F.normalize(reference_text(openai_sd, ids), dim=-1)
    torch.testing.assert_close(model.semantic_context.prompt_embeddings, expected, rtol=0, atol=1e-5)
    assert model.config.prompt_embedding_dim == expected.shape[1]


def test_folder_contents_and_card(converted_openai):
    files = {p.name for p in converted_openai.iterdir()}
    assert {"config.json", "model.safetensors", "preprocessor_config.json", "README.md"} | CODE_FILES <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth"))]
    assert not [p for p in converted_openai.parent.iterdir() if p.name.startswith(".tiny-moa")]  # staging removed
    config = json.loads((converted_openai / "config.json").read_text())
    assert config["auto_map"]["AutoModelForDepthEstimation"] == "modeling_moa_depthclip.MoADepthCLIPForDepthEstimation"
    assert config["moa_layers"] == [0, 1] and config["vision_config"]["hidden_act"] == "quick_gelu"
    processor = json.loads((converted_openai / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": IMAGE, "width": IMAGE}
    card = (converted_openai / "README.md").read_text()
    assert "No evaluation yet" in card and "model-index" not in metadata_load(converted_openai / "README.md")
    assert "Converted, not trained" in card and "ViT-tiny.pt" in card
    assert "{{" not in card


# ---------------------------------------------------------------- every source form gives the same checkpoint


def _open_clip_safetensors(sd, folder):
    path = folder / "open_clip_model.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in sd.items()}, path)
    return path


def _open_clip_bin(sd, folder):
    inner = {f"module.{k}": v for k, v in sd.items()}
    inner["module.attn_mask"] = torch.full((CTX, CTX), float("-inf")).triu(1)
    path = folder / "epoch_3.bin"
    torch.save({"epoch": 3, "name": "ViT-tiny-quickgelu", "state_dict": inner}, path)
    return path


def _torchscript(sd, folder):
    path = folder / "ViT-tiny-jit.pt"
    scripted_holder(sd).save(str(path))
    return path


@pytest.mark.parametrize(
    "write, layout",
    [
        (_torchscript, "openai layout"),
        (_open_clip_safetensors, "open_clip layout"),
        (_open_clip_bin, "open_clip layout"),
    ],
    ids=["openai-torchscript", "open_clip-safetensors", "open_clip-bin"],
)
def test_every_source_form_gives_the_same_checkpoint(
    write, layout, openai_sd, converted_openai, tokenizer_dir, tmp_path, capsys
):
    source = write(openai_sd, tmp_path)
    output = tmp_path / "out"
    code, out, err = run(
        ["--clip_model", source, "--output_dir", output, "--tokenizer", tokenizer_dir, *TINY_MOA_ARGS], capsys
    )
    assert code == 0, err
    assert layout in out and str(output) in out and "parameters:" in out
    # same weights, same seed: the same file as the plain OpenAI state dict's conversion
    reference = load_file(converted_openai / "model.safetensors")
    got = load_file(output / "model.safetensors")
    assert sorted(got) == sorted(reference)
    for key in reference:
        assert torch.equal(got[key], reference[key]), key


def test_hf_folder_with_its_own_tokenizer(tmp_path, capsys):
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=2, image_size=32,
                  patch_size=8)
    config = tiny_clip_config(tokenizer, vision, projection_dim=24, text_hidden_size=64)
    torch.manual_seed(5)
    clip = CLIPModel(config).eval()
    folder = tmp_path / "hf-clip"
    clip.save_pretrained(folder)
    tokenizer.save_pretrained(folder)

    output = tmp_path / "out"
    code, out, err = run(
        ["--clip_model", folder, "--output_dir", output, "--moa_layers", "1", "2", "--num_unfrozen_layers", "2",
         "--num_experts", "3", "--decoder", "paper", "--image_size", "64", "32"], capsys,
    )  # fmt: skip
    assert code == 0, err
    assert "hf layout" in out and f"tokenizer {folder}" in out

    model = AutoModelForDepthEstimation.from_pretrained(output)
    assert (model.config.num_experts, model.config.decoder, model.config.moa_layers) == (3, "paper", [1, 2])
    with torch.no_grad():
        inputs = tokenizer(DEPTHCLIP_PROMPTS, padding=True, return_tensors="pt")
        expected = F.normalize(clip.get_text_features(**inputs).pooler_output, dim=-1)
    torch.testing.assert_close(model.semantic_context.prompt_embeddings, expected, rtol=0, atol=1e-6)
    for key, value in clip.vision_model.state_dict().items():
        assert torch.equal(model.vision_model.state_dict()[key], value), key
    assert torch.equal(model.semantic_context.image_projection.weight, clip.visual_projection.weight)
    assert "base_model" not in (output / "README.md").read_text().split("---")[1]  # a local folder is no Hub id

    code, _, err = run(["--clip_model", folder, "--output_dir", tmp_path / "o2", "--hidden_act", "gelu"], capsys)
    assert code == 2 and "contradicts" in err


# ---------------------------------------------------------------- refusals: one line, exit code 2


@pytest.mark.parametrize(
    "key, problem",
    [("visual.transformer.resblocks.1.mlp.c_fc.bias", "missing"), ("visual.extra_head.weight", "unexpected")],
)
def test_mismatched_source_fails_with_the_key(key, problem, openai_sd, tokenizer_dir, tmp_path, capsys):
    broken = dict(openai_sd)
    if problem == "missing":
        del broken[key]
    else:
        broken[key] = torch.ones(3)
    torch.save(broken, tmp_path / "broken.pt")
    output = tmp_path / "out"
    code, out, err = run(
        ["--clip_model", tmp_path / "broken.pt", "--output_dir", output, "--tokenizer", tokenizer_dir, *TINY_MOA_ARGS],
        capsys,
    )
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and key in lines[0], err
    assert f"{problem} 1 key(s)" in lines[0]
    assert "Traceback" not in err and not output.exists()


def test_output_folder_is_not_overwritten_without_overwrite(openai_pt, tokenizer_dir, tmp_path, capsys):
    args = ["--clip_model", openai_pt, "--tokenizer", tokenizer_dir, *TINY_MOA_ARGS]
    output = tmp_path / "out"
    assert run([*args, "--output_dir", output], capsys)[0] == 0
    first = load_file(output / "model.safetensors")
    (output / "stale.bin").write_bytes(b"old")

    code, _, err = run([*args, "--output_dir", output, "--seed", "1"], capsys)
    assert code == 2 and "not empty" in err and "--overwrite" in err
    assert torch.equal(load_file(output / "model.safetensors")["head.regressor.weight"], first["head.regressor.weight"])

    assert run([*args, "--output_dir", output, "--seed", "1", "--overwrite"], capsys)[0] == 0
    second = load_file(output / "model.safetensors")
    assert not (output / "stale.bin").exists()  # the folder was replaced, not merged
    # another seed: other new modules, the same CLIP weights and prompt embeddings
    assert not torch.equal(second["head.regressor.weight"], first["head.regressor.weight"])
    for key in first:
        if key.startswith(("vision_model.", "semantic_context.prompt_embeddings", "semantic_context.image_projection")):
            assert torch.equal(second[key], first[key]), key

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "todo.txt").write_text("keep me")
    code, _, err = run([*args, "--output_dir", not_a_model, "--overwrite"], capsys)
    assert code == 2 and "does not look like a model folder" in err
    assert (not_a_model / "todo.txt").read_text() == "keep me"


def test_tokenizer_of_another_clip_is_refused(openai_pt, tmp_path, capsys):
    other = tmp_path / "other-tokenizer"
    make_clip_tokenizer(PROMPT_TEXTS, filler=50).save_pretrained(other)  # end-of-text id beyond this vocabulary
    code, _, err = run(
        ["--clip_model", openai_pt, "--output_dir", tmp_path / "out", "--tokenizer", other, *TINY_MOA_ARGS], capsys
    )
    assert code == 2 and "does not belong to this CLIP" in err


def test_missing_tokenizer_is_one_clear_error(openai_pt, tmp_path, capsys):
    code, _, err = run(
        ["--clip_model", openai_pt, "--output_dir", tmp_path / "out", "--tokenizer", tmp_path / "nope",
         *TINY_MOA_ARGS], capsys,
    )  # fmt: skip
    assert code == 2 and "cannot load the tokenizer" in err and "--tokenizer" in err
    assert len(err.strip().splitlines()) == 1


def test_prompts_from_a_file(openai_pt, openai_sd, tokenizer_dir, tokenizer, tmp_path, capsys):
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("# two prompts\nnear wall\n\nfar window\n")
    output = tmp_path / "out"
    code, _, err = run(
        ["--clip_model", openai_pt, "--output_dir", output, "--tokenizer", tokenizer_dir,
         "--depth_prompts_file", prompts_file, *TINY_MOA_ARGS], capsys,
    )  # fmt: skip
    assert code == 0, err
    model = AutoModelForDepthEstimation.from_pretrained(output)
    assert model.config.depth_prompts == ["near wall", "far window"]
    ids = tokenizer(["near wall", "far window"], padding=True, return_tensors="pt")["input_ids"]
    expected = F.normalize(reference_text(openai_sd, ids), dim=-1)
    torch.testing.assert_close(model.semantic_context.prompt_embeddings, expected, rtol=0, atol=1e-5)


def test_invalid_moa_option_is_one_clear_error(openai_pt, tokenizer_dir, tmp_path, capsys):
    code, _, err = run(
        ["--clip_model", openai_pt, "--output_dir", tmp_path / "out", "--tokenizer", tokenizer_dir,
         "--moa_layers", "2", "5", "8", "11"], capsys,
    )  # fmt: skip
    assert code == 2 and "moa_layers" in err and "2 blocks" in err


def test_help_says_what_torchscript_loading_trusts(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "executes nothing from the file" in text and "arbitrary code" in text and "torch.jit.load" in text


def test_build_config_keeps_defaults_for_unset_options(openai_sd):
    from modeling_moa_depthclip.clip.checkpoints import openai_to_hf_clip

    _, clip_config = openai_to_hf_clip(openai_sd)
    config = build_config(
        clip_config.vision_config, 32, moa_layers=[1], num_unfrozen_layers=0, num_experts=None
    )
    assert config.moa_layers == [1] and config.num_experts == 4 and config.prompt_embedding_dim == 32
    assert config.vision_config.hidden_size == clip_config.vision_config.hidden_size
    with pytest.raises(TypeError, match="unknown MoA options"):
        build_config(clip_config.vision_config, 32, router_kind="x")
