"""Run examples/train.py with a fault injected at a chosen moment: the fault-injection tests' wrapper.

    python tests/fault_injection.py POINT:STEP[:SIGNAL] [train.py flags...]

The library has no hook for this: the wrapper patches the functions of modeling_moa_depthclip.training.run_folder
that a run goes through, so that the process signals itself (SIGKILL unless SIGNAL is given) at POINT of step STEP:

- `step`: while step STEP is computed (after its gradients, before its update): a SIGINT/SIGTERM there is handled
  after the step, as one arriving at any moment of it;
- `checkpoint`: checkpoint STEP's files are written, it is not marked complete yet;
- `prune`: checkpoint STEP is complete and in place, older ones are not pruned yet;
- `best` / `final`: the new model folder of step STEP is written, not swapped in yet.
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
from pathlib import Path

from modeling_moa_depthclip.training import run_folder

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train.py"
POINTS = ("step", "checkpoint", "prune", "best", "final")


def _signal_self(signame: str):
    os.kill(os.getpid(), getattr(signal, signame))


def fault_patches(spec: str) -> list[tuple[object, str, object]]:
    """`(owner, attribute, replacement)` triples that make a run signal itself at `spec` (`POINT:STEP[:SIGNAL]`)."""
    point, step, signame = (spec.split(":") + ["SIGKILL"])[:3]
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}: expected one of {POINTS}")
    step = int(step)
    if point == "step":
        original = run_folder.NonFiniteGuard.step_is_finite

        def step_is_finite(self, current, *args, **kwargs):
            if current == step:
                _signal_self(signame)
            return original(self, current, *args, **kwargs)

        return [(run_folder.NonFiniteGuard, "step_is_finite", step_is_finite)]
    if point == "checkpoint":
        original_save = run_folder.TrainingProgress.save

        def save(self, folder):
            original_save(self, folder)  # the last file of accelerate's state and the progress are written
            if Path(folder).name == f"step_{step}{run_folder.TMP_SUFFIX}":
                _signal_self(signame)

        return [(run_folder.TrainingProgress, "save", save)]
    original_swap = run_folder._swap_in

    def swap_in(new: Path, target: Path):
        if point in ("best", "final") and target.name == point:
            info = json.loads((Path(new) / "training_info.json").read_text())
            if info.get("step") == step:
                _signal_self(signame)
        original_swap(new, target)
        if point == "prune" and target.name == f"step_{step}":
            _signal_self(signame)

    return [(run_folder, "_swap_in", swap_in)]


def main():
    spec, *train_args = sys.argv[1:]
    for owner, name, replacement in fault_patches(spec):
        setattr(owner, name, replacement)
    sys.argv = [str(TRAIN_SCRIPT), *train_args]
    runpy.run_path(str(TRAIN_SCRIPT), run_name="__main__")


if __name__ == "__main__":
    main()
