"""conversion/convert_prototype_checkpoint.py on a randomly initialised state dict in the prototype's layout.

The adapted hidden states are checked against a reference forward pass written from the OpenAI layout and the
prototype's adapter formula `x + up(gelu(down(x)))` (test_clip_checkpoints.py's reference blocks), independent of
both converters.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForDepthEstimation


from conversion import convert_prototype_checkpoint as prototype  # noqa: E402
from conversion.convert_clip_to_moa_depthclip import ConversionError  # noqa: E402
from conversion.convert_prototype_checkpoint import main  # noqa: E402
from test_clip_checkpoints import EMBED, IMAGE, PATCH, V_WIDTH, _block, _ln, make_openai_state_dict  # noqa: E402
from test_conversion import PROMPT_TEXTS, make_clip_tokenizer, openai_state_dict_for  # noqa: E402

BLOCKS = 4
ADAPTER_LAYERS = [1, 3]  # blocks 0 and 2 stay unadapted, so a misplaced adapter shows
BOTTLENECK = 16
HEAD_KEYS = {"text_features": (7, EMBED), "bin_values": (7,)}
UNKNOWN_KEYS = {"depth_refiner.weight": (4, 4)}


def make_prototype_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """open_clip visual.* with 4 blocks, 2 adapters, project_to_text_dim (with bias) and head buffers."""
    first, second = make_openai_state_dict(seed), make_openai_state_dict(seed + 1)
    sd = {k: v for k, v in first.items() if k.startswith("visual.")}
    for key, value in second.items():  # blocks 2 and 3 from another random CLIP
        if key.startswith("visual.transformer.resblocks."):
            parts = key.split(".")
            parts[3] = str(int(parts[3]) + 2)
            sd[".".join(parts)] = value
    g = torch.Generator().manual_seed(seed + 7)
    for i in range(len(ADAPTER_LAYERS)):
        sd[f"adapters.{i}.down_project.weight"] = torch.randn(BOTTLENECK, V_WIDTH, generator=g) * V_WIDTH**-0.5
        sd[f"adapters.{i}.down_project.bias"] = torch.randn(BOTTLENECK, generator=g) * 0.1
        sd[f"adapters.{i}.up_project.weight"] = torch.randn(V_WIDTH, BOTTLENECK, generator=g) * 0.3
        sd[f"adapters.{i}.up_project.bias"] = torch.randn(V_WIDTH, generator=g) * 0.1
    sd["project_to_text_dim.weight"] = torch.randn(EMBED, V_WIDTH, generator=g) * V_WIDTH**-0.5
    sd["project_to_text_dim.bias"] = torch.randn(EMBED, generator=g) * 0.1
    for key, shape in {**HEAD_KEYS, **UNKNOWN_KEYS}.items():
        sd[key] = torch.randn(*shape, generator=g)
    return sd


def reference_prototype(sd, pixels, adapters=True):
    """The prototype's image tower: OpenAI ViT blocks, `x + up(gelu(down(x)))` after each adapted block."""
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, -1), x], dim=1)
    x = x + sd["visual.positional_embedding"]
    x = _ln(sd, "visual.ln_pre", x)
    states = [x]
    for block in range(BLOCKS):
        x = _block(sd, f"visual.transformer.resblocks.{block}", x)
        if adapters and block in ADAPTER_LAYERS:
            a = f"adapters.{ADAPTER_LAYERS.index(block)}"
            hidden = F.gelu(F.linear(x, sd[f"{a}.down_project.weight"], sd[f"{a}.down_project.bias"]))
            x = x + F.linear(hidden, sd[f"{a}.up_project.weight"], sd[f"{a}.up_project.bias"])
        states.append(x)
    return states


@pytest.fixture(scope="module")
def prototype_sd():
    return make_prototype_state_dict()


@pytest.fixture(scope="module")
def prototype_file(prototype_sd, tmp_path_factory):
    path = tmp_path_factory.mktemp("prototype") / "best_model.pth"
    optimizer = {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0, 1]}]}
    torch.save({"epoch": 31, "model_state_dict": prototype_sd, "optimizer_state_dict": optimizer}, path)
    return path


@pytest.fixture(scope="module")
def prompt_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("prompts") / "text_features.pt"
    torch.save(torch.randn(7, EMBED, generator=torch.Generator().manual_seed(3)) * 4, path)
    return path


def args_for(checkpoint, output, *extra):
    return ["--checkpoint", str(checkpoint), "--output_dir", str(output), "--adapter_layers",
            *map(str, ADAPTER_LAYERS), "--num_unfrozen_layers", "2", "--image_size", str(IMAGE), str(IMAGE),
            *map(str, extra)]  # fmt: skip


@pytest.fixture(scope="module")
def converted(prototype_file, prompt_file, tmp_path_factory):
    output = tmp_path_factory.mktemp("converted") / "proto"
    assert main(args_for(prototype_file, output, "--prompt_embeddings", prompt_file)) == 0
    return output


def test_adapted_hidden_states_match_the_prototype(converted, prototype_sd):
    model = AutoModelForDepthEstimation.from_pretrained(converted).eval()
    assert (model.config.num_experts, model.config.moa_layers, model.config.adapter_bottleneck) == (
        1, ADAPTER_LAYERS, BOTTLENECK,
    )  # fmt: skip
    pixels = torch.randn(2, 3, IMAGE, IMAGE, generator=torch.Generator().manual_seed(4))
    reference = reference_prototype(prototype_sd, pixels)
    unadapted = reference_prototype(prototype_sd, pixels, adapters=False)
    assert (reference[-1] - unadapted[-1]).abs().max() > 0.1  # the adapters matter at this scale
    with torch.no_grad():
        hidden_states = model(pixel_values=pixels, output_hidden_states=True).hidden_states
        # the router is irrelevant with one expert: randomising it changes nothing
        for moa in model.moa.values():
            for parameter in moa.router.parameters():
                parameter.normal_(0, 3.0)
        rerouted = model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert len(hidden_states) == BLOCKS + 1
    for index, (ours, expected) in enumerate(zip(hidden_states, reference)):
        torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5, msg=f"hidden state {index}")
        assert torch.equal(rerouted[index], ours)
    # image_projection holds CLIP's visual.proj by default
    assert torch.equal(model.semantic_context.image_projection.weight, prototype_sd["visual.proj"].t())


def test_prompt_embeddings_from_file_are_normalised(converted, prompt_file):
    model = AutoModelForDepthEstimation.from_pretrained(converted)
    expected = F.normalize(torch.load(prompt_file), dim=-1)
    torch.testing.assert_close(model.semantic_context.prompt_embeddings, expected, rtol=0, atol=1e-7)


def test_report_lists_everything_that_did_not_map(converted, prototype_sd, capsys):
    report = json.loads((converted / "conversion_report.json").read_text())
    not_mapped = {row["source"]: row["reason"] for row in report["not_mapped"]}
    assert set(not_mapped) == {"project_to_text_dim.weight", "project_to_text_dim.bias", *HEAD_KEYS, *UNKNOWN_KEYS}
    assert all("prompt-scoring depth head" in not_mapped[key] for key in HEAD_KEYS)
    assert not_mapped["depth_refiner.weight"] == prototype.NO_COUNTERPART
    assert "image_projection" in not_mapped["project_to_text_dim.weight"]
    assert report["checkpoint_entries_not_weights"] == ["epoch", "optimizer_state_dict"]
    # never silently dropped: every tensor is either mapped or listed
    mapped = {row["source"] for row in report["mapped"]}
    assert mapped | set(not_mapped) == set(prototype_sd) and not mapped & set(not_mapped)
    targets = {t for row in report["mapped"] for t in row["target"]}
    assert {"moa.1.experts.down_proj.weight", "moa.3.experts.up_bias", "semantic_context.image_projection.weight",
            "vision_model.encoder.layers.3.self_attn.q_proj.weight"} <= targets  # fmt: skip
    assert any("GELU" in assumption for assumption in report["assumptions"])
    assert any("adapter x + up(gelu(down(x)))" in check for check in report["self_check"])
    card = (converted / "README.md").read_text()
    assert "prototype" in card and "`depth_refiner.weight`" in card and "No evaluation yet" in card


def test_printed_table(prototype_file, prompt_file, tmp_path, capsys):
    assert main(args_for(prototype_file, tmp_path / "out", "--prompt_embeddings", prompt_file)) == 0
    out = capsys.readouterr().out
    assert "NOT MAPPED (5)" in out and "depth_refiner.weight (4, 4): no counterpart" in out
    assert "adapters.*.down_project.weight (x2)" in out and "moa.*.experts.down_proj.weight" in out
    assert "visual.transformer.resblocks.*.attn.in_proj_weight (x4)" in out


def test_prototype_projection_on_request(prototype_file, prototype_sd, prompt_file, tmp_path, capsys):
    output = tmp_path / "out"
    code = main(args_for(prototype_file, output, "--prompt_embeddings", prompt_file,
                         "--image_projection", "project_to_text_dim"))  # fmt: skip
    assert code == 0, capsys.readouterr().err
    model = AutoModelForDepthEstimation.from_pretrained(output)
    assert torch.equal(model.semantic_context.image_projection.weight, prototype_sd["project_to_text_dim.weight"])
    report = json.loads((output / "conversion_report.json").read_text())
    not_mapped = {row["source"]: row["reason"] for row in report["not_mapped"]}
    assert "visual.proj" in not_mapped and "has no bias" in not_mapped["project_to_text_dim.bias"]
    assert report["configuration"]["image_projection"] == "project_to_text_dim"


def test_tower_saved_without_visual_proj_uses_the_prototype_projection(prototype_sd, prompt_file, tmp_path, capsys):
    without = {k: v for k, v in prototype_sd.items() if k != "visual.proj"}
    torch.save(without, tmp_path / "no_proj.pt")
    output = tmp_path / "out"
    assert main(args_for(tmp_path / "no_proj.pt", output, "--prompt_embeddings", prompt_file)) == 0
    model = AutoModelForDepthEstimation.from_pretrained(output)
    assert torch.equal(model.semantic_context.image_projection.weight, prototype_sd["project_to_text_dim.weight"])
    report = json.loads((output / "conversion_report.json").read_text())
    assert report["configuration"]["image_projection"] == "project_to_text_dim"
    assert {row["source"] for row in report["not_mapped"]} == {"project_to_text_dim.bias", *HEAD_KEYS, *UNKNOWN_KEYS}


def test_prompt_embeddings_from_a_clip_text_tower(prototype_file, tmp_path, capsys):
    tokenizer = make_clip_tokenizer(PROMPT_TEXTS)
    tokenizer.save_pretrained(tmp_path / "tokenizer")
    clip_sd = openai_state_dict_for(tokenizer)
    torch.save(clip_sd, tmp_path / "ViT-tiny.pt")
    output = tmp_path / "out"
    code = main(args_for(prototype_file, output, "--clip_model", tmp_path / "ViT-tiny.pt",
                         "--tokenizer", tmp_path / "tokenizer"))  # fmt: skip
    assert code == 0, capsys.readouterr().err
    from test_clip_checkpoints import reference_text
    from modeling_moa_depthclip import DEPTHCLIP_PROMPTS

    ids = tokenizer(DEPTHCLIP_PROMPTS, padding=True, return_tensors="pt")["input_ids"]
    model = AutoModelForDepthEstimation.from_pretrained(output)
    expected = F.normalize(reference_text(clip_sd, ids), dim=-1)
    torch.testing.assert_close(model.semantic_context.prompt_embeddings, expected, rtol=0, atol=1e-5)
    report = json.loads((output / "conversion_report.json").read_text())
    # blocks 0-1, embeddings and norms are the tiny CLIP's; blocks 2-3 are not
    assert report["prompt_embeddings"]["vision_tensors_identical_to_clip_model"] == "39 of 71"


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda sd: sd.pop("visual.transformer.resblocks.2.ln_1.bias"), "visual.transformer.resblocks.2.ln_1.bias"),
        (lambda sd: sd.pop("adapters.1.up_project.weight"), "adapters.1.up_project.weight is missing"),
        (lambda sd: sd.update({"adapters.0.up_project.weight": torch.zeros(V_WIDTH, BOTTLENECK + 1)}),
         "adapters.0.up_project.weight"),
        (lambda sd: sd.update({"visual.transformer.resblocks.0.ls_1.gamma": torch.ones(V_WIDTH)}),
         "unexpected 1 key(s) [visual.transformer.resblocks.0.ls_1.gamma]"),
    ],
    ids=["missing-vision", "missing-adapter", "adapter-shape", "extra-vision"],
)
def test_structural_mismatch_is_one_clear_error(edit, message, prototype_sd, prompt_file, tmp_path, capsys):
    broken = dict(prototype_sd)
    edit(broken)
    torch.save(broken, tmp_path / "broken.pt")
    code = main(args_for(tmp_path / "broken.pt", tmp_path / "out", "--prompt_embeddings", prompt_file))
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_adapter_layers_are_required_off_the_paper_architecture(prototype_file, prompt_file, tmp_path, capsys):
    code = main(["--checkpoint", str(prototype_file), "--output_dir", str(tmp_path / "o"),
                 "--prompt_embeddings", str(prompt_file)])  # fmt: skip
    assert code == 2 and "--adapter_layers" in capsys.readouterr().err
    code = main(args_for(prototype_file, tmp_path / "o", "--prompt_embeddings", prompt_file, "--adapter_layers", "1"))
    assert code == 2 and "2 adapters" in capsys.readouterr().err


def test_prompt_embeddings_of_the_wrong_shape(prototype_file, tmp_path, capsys):
    torch.save(torch.randn(5, EMBED), tmp_path / "five.pt")
    code = main(args_for(prototype_file, tmp_path / "o", "--prompt_embeddings", tmp_path / "five.pt"))
    assert code == 2 and "(7, 32)" in capsys.readouterr().err


def test_default_adapter_layers_follow_the_prototype():
    sd = make_prototype_state_dict()
    twelve = {}
    for key, value in sd.items():
        if key.startswith("visual.transformer.resblocks."):
            parts = key.split(".")
            for copy in range(3):  # 4 blocks -> 12 blocks
                twelve[".".join(parts[:3] + [str(int(parts[3]) + 4 * copy)] + parts[4:])] = value
        else:
            twelve[key] = value
    for i in (2, 3):
        for name in ("down_project.weight", "down_project.bias", "up_project.weight", "up_project.bias"):
            twelve[f"adapters.{i}.{name}"] = twelve[f"adapters.{i - 2}.{name}"]
    _, layers = prototype.map_prototype(twelve)
    assert layers == [2, 5, 8, 11]


def test_adapter_activation_must_be_exact_gelu():
    from tiny_models import tiny_model

    model = tiny_model(num_experts=1)
    prototype.check_adapter_activation(model)
    model.moa["1"].experts.act = nn.GELU(approximate="tanh")
    with pytest.raises(ConversionError, match="exact erf"):
        prototype.check_adapter_activation(model)
