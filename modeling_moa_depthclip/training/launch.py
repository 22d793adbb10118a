"""What a run was launched with, and what a resumed run continues from: one line each when they differ.

- `accelerate launch --cpu --num_processes 2` starts one process (its simple launcher ignores the count unless MPI is
  configured); `launch_shortfall` reads what the launcher was asked for (its command line, else its config file) and
  says so.
- A checkpoint records the number of processes, the per-device batch and the accumulation it was saved with
  (`launch_setup`); `resume_mismatch` names what changed and that the resumed run is not an exact continuation
  (another world size shards the epoch's order differently, another batch or accumulation changes every step).
"""

from __future__ import annotations

from pathlib import Path

import psutil
from accelerate.commands.config.config_args import default_config_file, load_config_from_file
from accelerate.commands.launch import launch_command_parser

__all__ = ["launch_setup", "launch_shortfall", "requested_num_processes", "resume_mismatch"]

SETUP_KEYS = ("num_processes", "per_device_train_batch_size", "gradient_accumulation_steps")


def _launcher_arguments(cmdline: list[str]) -> list[str] | None:
    """The arguments after `accelerate launch` in a command line, or None if it is not one."""
    for position, item in enumerate(cmdline[:-1]):
        if Path(item).name.startswith("accelerate") and cmdline[position + 1] == "launch":
            return cmdline[position + 2:]
    return None


def requested_num_processes(cmdline: list[str] | None = None) -> int | None:
    """How many processes `accelerate launch` was asked for, when it started this process (None otherwise).

    `cmdline` defaults to the parent process's command line: `accelerate launch` runs the script as its child.
    """
    if cmdline is None:
        try:
            parent = psutil.Process().parent()
            cmdline = parent.cmdline() if parent is not None else []
        except psutil.Error:
            return None
    arguments = _launcher_arguments(cmdline)
    if arguments is None:
        return None
    launch_args, _ = launch_command_parser().parse_known_args(arguments)
    if launch_args.num_processes is not None:
        return int(launch_args.num_processes)
    config_file = launch_args.config_file or default_config_file
    if not Path(config_file).is_file():
        return None
    try:
        return int(load_config_from_file(config_file).num_processes)
    except (OSError, ValueError, TypeError, AttributeError):
        return None


def launch_shortfall(num_processes: int, requested: int | None) -> str | None:
    """One line when the launcher was asked for more processes than the run has, else None."""
    if requested is None or requested <= num_processes:
        return None
    return (
        f"accelerate launch was asked for {requested} processes but started {num_processes}: this run trains on "
        f"{num_processes} process(es) (accelerate's CPU launcher starts one unless MPI is configured; for several CPU "
        f"processes use ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes {requested})"
    )


def launch_setup(num_processes: int, per_device_train_batch_size: int, gradient_accumulation_steps: int) -> dict:
    """What a checkpoint records of the run's launch, for `resume_mismatch`."""
    return dict(zip(SETUP_KEYS, (int(num_processes), int(per_device_train_batch_size), int(gradient_accumulation_steps))))


def resume_mismatch(saved: dict | None, current: dict, checkpoint) -> str | None:
    """One line when a checkpoint was saved with another launch setup than the resumed run's, else None."""
    if not saved:  # a checkpoint from before the setup was recorded
        return None
    changed = [key for key in SETUP_KEYS if key in saved and saved[key] != current[key]]
    if not changed:
        return None
    names = {"num_processes": "processes", "per_device_train_batch_size": "per-device batch",
             "gradient_accumulation_steps": "gradient accumulation"}
    what = ", ".join(f"{names[key]} {saved[key]} -> {current[key]}" for key in changed)
    why = ("the data of each step is sharded differently" if changed == ["num_processes"]
           else "each step sees another number of examples")
    return (
        f"resuming {checkpoint} with another setup than it was saved with ({what}): {why}, so the resumed run is not "
        "an exact continuation of the interrupted one (the step count and learning-rate schedule go on)"
    )
