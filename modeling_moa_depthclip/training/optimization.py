"""The paper's optimisation recipe: AdamW parameter groups with two learning rates, and warm-up + decay."""

from __future__ import annotations

import torch
from transformers import get_scheduler


__all__ = ["create_lr_scheduler", "default_warmup_steps", "parameter_groups"]

# fraction of the training steps spent in linear warm-up unless the user sets a number
WARMUP_FRACTION = 0.05


def parameter_groups(model, learning_rate: float, backbone_learning_rate: float, weight_decay: float) -> list[dict]:
    """AdamW groups: {head, backbone} x {decay, no decay}; trainable parameters only, empty groups dropped.

    `head` = everything outside `vision_model.` (MoA, semantic context, decoder, head) at `learning_rate`;
    `backbone` = the unfrozen CLIP blocks at `backbone_learning_rate`. Biases and norm weights (any parameter with
    fewer than 2 dimensions or named `*bias`) get no weight decay. Each group has a `name` for logging.
    """
    groups = {}
    for name, parameter in model.named_parameters():
        if not parameter.requires_grad:
            continue
        part = "backbone" if name.startswith("vision_model.") else "head"
        decay = parameter.ndim >= 2 and not name.endswith("bias") and "norm" not in name.lower()
        key = (part, decay)
        if key not in groups:
            groups[key] = {
                "params": [],
                "lr": backbone_learning_rate if part == "backbone" else learning_rate,
                "weight_decay": weight_decay if decay else 0.0,
                "name": f"{part}{'' if decay else '_no_decay'}",
            }
        groups[key]["params"].append(parameter)
    order = [("head", True), ("head", False), ("backbone", True), ("backbone", False)]
    return [groups[key] for key in order if key in groups]


def default_warmup_steps(num_training_steps: int) -> int:
    return round(WARMUP_FRACTION * num_training_steps)


def create_lr_scheduler(
    name: str,
    optimizer: torch.optim.Optimizer,
    num_warmup_steps: int,
    num_training_steps: int,
    num_processes: int = 1,
):
    """transformers' `get_scheduler` (linear warm-up, then `name`) for a scheduler that accelerate will prepare.

    accelerate steps a prepared scheduler once per process per optimizer step, so both step counts are scaled by
    `num_processes`.
    """
    return get_scheduler(
        name, optimizer=optimizer,
        num_warmup_steps=num_warmup_steps * num_processes,
        num_training_steps=num_training_steps * num_processes,
    )
