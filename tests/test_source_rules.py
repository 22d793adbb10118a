"""Rules read from the sources themselves: no private transformers API, and the MoA model knows nothing of the
DepthCLIP zero-shot baseline (its own model)."""

import ast
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SOURCE_DIRS = ("modeling_moa_depthclip", "conversion", "examples", "demo", "benchmarks")


def python_files():
    return sorted(p for d in SOURCE_DIRS for p in (REPO_ROOT / d).rglob("*.py"))


def private_transformers_uses(source: str) -> list[str]:
    """`_`-prefixed names imported from transformers, or read from a transformers module or class by attribute."""
    tree = ast.parse(source)
    found, from_transformers = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "transformers":
            for alias in node.names:
                from_transformers.add(alias.asname or alias.name)
                if alias.name.startswith("_") or any(part.startswith("_") for part in node.module.split(".")):
                    found.append(f"from {node.module} import {alias.name}")
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "transformers":
                    from_transformers.add(alias.asname or alias.name.split(".")[0])
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
            root = node.value
            while isinstance(root, ast.Attribute):
                root = root.value
            if isinstance(root, ast.Name) and root.id in from_transformers:
                found.append(f"{ast.unparse(node)} (line {node.lineno})")
    return found


def test_the_check_finds_what_it_looks_for():
    source = (
        "from transformers.pipelines import _resolve_impl\nfrom transformers import CLIPVisionModel\n"
        "import transformers\nm = CLIPVisionModel._from_config(c)\nx = transformers.utils._private\n"
    )
    assert len(private_transformers_uses(source)) == 3


@pytest.mark.parametrize("path", python_files(), ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_no_private_transformers_name_is_used(path):
    assert private_transformers_uses(path.read_text(encoding="utf-8")) == []


@pytest.mark.parametrize("name", ["configuration_moa_depthclip.py", "modeling_moa_depthclip.py"])
def test_the_moa_model_has_no_branch_for_the_zero_shot_baseline(name):
    tree = ast.parse((REPO_ROOT / "modeling_moa_depthclip" / name).read_text(encoding="utf-8"))
    mentions = [
        ast.unparse(node)
        for node in ast.walk(tree)
        if (isinstance(node, ast.Constant) and node.value in ("depthclip", "zero_shot"))
        or (isinstance(node, ast.Attribute) and node.attr.startswith(("depthclip", "_zero_shot")))
        or (isinstance(node, ast.Name) and "zero_shot" in node.id.lower())
        or (isinstance(node, (ast.FunctionDef, ast.ClassDef)) and "zeroshot" in node.name.lower().replace("_", ""))
    ]
    assert mentions == []
    from modeling_moa_depthclip.configuration_moa_depthclip import HEADS

    assert HEADS == ("hybrid", "classification", "regression")
