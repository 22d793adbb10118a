"""modeling_moa_depthclip.training.run_folder: complete-or-invisible checkpoints, atomic model folders, the run lock,
signals and the divergence guard, on plain folders and a CPU Accelerator (no training)."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from modeling_moa_depthclip.training import run_folder as ckpt
from modeling_moa_depthclip.training.run_folder import (
    CheckpointError,
    GracefulInterrupt,
    NonFiniteGuard,
    NonFiniteTrainingError,
    OutputDirInUseError,
    RunLock,
    TrainingProgress,
)

from tiny_models import tiny_model, tiny_processor



@pytest.fixture
def accelerator():
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield Accelerator(cpu=True)
    AcceleratorState._reset_state(True)
    GradientState._reset_state()


@pytest.fixture
def prepared(accelerator):
    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    model, optimizer = accelerator.prepare(model, optimizer)
    return accelerator, model, optimizer


def _progress(step: int) -> TrainingProgress:
    progress = TrainingProgress()
    progress.global_step = step
    progress.loss_history = [[s, 1.0 / s] for s in range(1, step + 1)]
    return progress


def _names(output_dir: Path) -> list[str]:
    return [path.name for _, path in ckpt.list_checkpoints(output_dir)]


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def test_checkpoints_are_complete_or_invisible_and_latest_skips_broken_ones(prepared, tmp_path, caplog):
    accelerator, model, _ = prepared
    for step in (2, 4):
        path = ckpt.save_checkpoint(accelerator, tmp_path, step, _progress(step))
        assert ckpt.checkpoint_problem(path) is None
    assert _names(tmp_path) == ["step_2", "step_4"]
    assert not list((tmp_path / "checkpoints").glob("*.tmp"))

    # what kills leave behind: a half-written temporary folder, a step_N without its completion marker, and a
    # checkpoint whose weights file was cut short
    folder = tmp_path / "checkpoints"
    (folder / "step_8.tmp").mkdir()
    (folder / "step_8.tmp" / "model.safetensors").write_bytes(b"\0" * 10)
    (folder / "step_7").mkdir()
    (folder / "step_7" / "training_progress.json").write_text(json.dumps(_progress(7).state_dict()))
    truncated = ckpt.save_checkpoint(accelerator, tmp_path, 6, _progress(6))
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-7])

    assert _names(tmp_path) == ["step_2", "step_4"]
    assert "model.safetensors is" in ckpt.checkpoint_problem(truncated)
    assert "not marked complete" in ckpt.checkpoint_problem(folder / "step_7")
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        chosen = ckpt.resolve_resume_checkpoint(tmp_path, "latest")
    assert chosen == folder / "step_4"
    skipped = "\n".join(r.getMessage() for r in caplog.records)
    for name in ("step_6", "step_7", "step_8.tmp"):
        assert f"skipping {folder / name}" in skipped, skipped

    # naming an incomplete one is an error that names it, why, and the checkpoint to use instead
    with pytest.raises(CheckpointError) as error:
        ckpt.resolve_resume_checkpoint(tmp_path, str(folder / "step_7"))
    message = str(error.value)
    assert str(folder / "step_7") in message and "incomplete" in message and str(folder / "step_4") in message
    with pytest.raises(CheckpointError, match="model.safetensors"):
        ckpt.resolve_resume_checkpoint(tmp_path, str(truncated))
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        ckpt.resolve_resume_checkpoint(tmp_path, str(folder / "step_99"))
    assert ckpt.resolve_resume_checkpoint(tmp_path, str(folder / "step_2")) == folder / "step_2"
    assert ckpt.resolve_resume_checkpoint(tmp_path / "nothing", "latest") is None

    # a complete checkpoint restores what was saved
    progress = TrainingProgress()
    progress.load(folder / "step_4")
    assert progress.global_step == 4 and progress.loss_history == _progress(4).loss_history


def test_pruning_waits_for_the_new_checkpoint_to_be_complete(prepared, tmp_path, monkeypatch):
    accelerator, model, _ = prepared
    for step in (1, 2, 3):
        ckpt.save_checkpoint(accelerator, tmp_path, step, _progress(step), total_limit=2)
    assert _names(tmp_path) == ["step_2", "step_3"]
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_2", "step_3"]

    # a save that dies half-way (here: an exception after the first file) removes nothing
    real_save_state = accelerator.save_state

    def dying_save_state(output_dir, **kwargs):
        os.makedirs(output_dir, exist_ok=True)
        Path(output_dir, "model.safetensors").write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(accelerator, "save_state", dying_save_state)
    with pytest.raises(OSError, match="disk full"):
        ckpt.save_checkpoint(accelerator, tmp_path, 4, _progress(4), total_limit=2)
    assert _names(tmp_path) == ["step_2", "step_3"]
    assert ckpt.resolve_resume_checkpoint(tmp_path, "latest") == tmp_path / "checkpoints" / "step_3"

    # the next successful save replaces the leftover and only then prunes
    monkeypatch.setattr(accelerator, "save_state", real_save_state)
    ckpt.save_checkpoint(accelerator, tmp_path, 4, _progress(4), total_limit=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_3", "step_4"]

    # a kill during removal leaves step_N.old: invisible to `latest`, cleared by the next pruning
    os.rename(tmp_path / "checkpoints" / "step_3", tmp_path / "checkpoints" / "step_3.old")
    assert _names(tmp_path) == ["step_4"]
    ckpt.save_checkpoint(accelerator, tmp_path, 5, _progress(5), total_limit=2)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_4", "step_5"]


def test_model_folders_are_swapped_in_whole_and_never_hold_nonfinite_weights(accelerator, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    model, processor = tiny_model(seed=0), tiny_processor()
    best = tmp_path / "best"
    ckpt.save_model_folder(accelerator, model, processor, best, {"step": 2})
    good = load_file(best / "model.safetensors")

    # a write that fails half-way leaves the previous best/ as it was
    real = type(model).save_pretrained

    def failing_save_pretrained(self, folder, **kwargs):
        Path(folder, "model.safetensors").write_bytes(b"partial")
        raise OSError("killed")

    monkeypatch.setattr(type(model), "save_pretrained", failing_save_pretrained)
    with pytest.raises(OSError):
        ckpt.save_model_folder(accelerator, tiny_model(seed=1), processor, best, {"step": 4})
    monkeypatch.setattr(type(model), "save_pretrained", real)
    assert all(torch.equal(good[k], v) for k, v in load_file(best / "model.safetensors").items())
    assert ckpt.recover_model_folders(tmp_path) == [f"removed {tmp_path / 'best.tmp'} (an interrupted write of best/)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]

    # non-finite weights are refused, naming the step and a parameter; best/ is untouched
    broken = tiny_model(seed=1)
    with torch.no_grad():
        broken.head.regressor.weight[0, 0] = float("nan")
    with pytest.raises(NonFiniteTrainingError, match=r"at step 6: 1 parameter\(s\) hold NaN.*head.regressor.weight"):
        ckpt.save_model_folder(accelerator, broken, processor, best, {"step": 6})
    assert json.loads((best / "training_info.json").read_text()) == {"step": 2}

    # a kill between the two renames of the swap (old moved aside, new not yet in place): the old one comes back
    os.rename(best, tmp_path / "best.old")
    (tmp_path / "best.tmp").mkdir()
    notes = ckpt.recover_model_folders(tmp_path)
    assert any("restored" in note for note in notes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert json.loads((best / "training_info.json").read_text()) == {"step": 2}
    # and a kill after the swap, before the old one was removed: the new one stays
    ckpt.save_model_folder(accelerator, tiny_model(seed=1), processor, best, {"step": 8})
    (tmp_path / "best.old").mkdir()
    ckpt.recover_model_folders(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]
    assert json.loads((best / "training_info.json").read_text()) == {"step": 8}


# ------------------------------------------------------------------------------------------------
# The run lock
# ------------------------------------------------------------------------------------------------


# loads the module by path: the package's transformers import would triple the start-up time
HOLDER = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("checkpointing", sys.argv[2])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
lock = module.RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def _start_holder(output_dir: Path) -> subprocess.Popen:
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(output_dir), ckpt.__file__], stdout=subprocess.PIPE,
                              text=True)
    assert holder.stdout.readline().strip() == "locked"
    return holder


def test_one_run_per_output_folder_and_a_dead_runs_lock_is_taken_over(tmp_path, caplog):
    holder = _start_holder(tmp_path)
    try:
        with pytest.raises(OutputDirInUseError) as error:
            RunLock(tmp_path).acquire()
        message = str(error.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and str(tmp_path) in message
    finally:
        holder.kill()
        holder.wait()
    # SIGKILL left the lock file behind; its flock died with the process
    assert (tmp_path / ckpt.LOCK_FILE).is_file()
    with caplog.at_level(logging.WARNING, logger=ckpt.logger.name):
        lock = RunLock(tmp_path).acquire()
    assert lock.previous["pid"] == holder.pid
    assert any(f"pid {holder.pid}" in r.getMessage() and "taking over" in r.getMessage() for r in caplog.records)
    # within one process too, a second lock is refused; release frees it and removes the file
    with pytest.raises(OutputDirInUseError):
        RunLock(tmp_path).acquire()
    lock.release()
    assert not (tmp_path / ckpt.LOCK_FILE).exists()
    with RunLock(tmp_path) as again:
        assert again.held and again.previous is None


def test_without_flock_the_recorded_pid_decides(tmp_path, monkeypatch):
    import errno
    import fcntl

    def no_flock(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = ckpt.socket.gethostname()
    lock_file = tmp_path / ckpt.LOCK_FILE
    lock_file.write_text(json.dumps({"pid": dead.pid, "host": host, "started": time.time()}))
    lock = RunLock(tmp_path).acquire()
    assert lock.previous["pid"] == dead.pid
    assert json.loads(lock_file.read_text())["pid"] == os.getpid()
    with pytest.raises(OutputDirInUseError, match=f"pid {os.getpid()}"):
        RunLock(tmp_path).acquire()  # the live holder (this process) keeps it
    lock.release()
    lock_file.write_text(json.dumps({"pid": 1, "host": "another-host", "started": time.time()}))
    with pytest.raises(OutputDirInUseError, match="another-host"):
        RunLock(tmp_path).acquire()  # another machine's run cannot be judged from here


# ------------------------------------------------------------------------------------------------
# Signals and divergence
# ------------------------------------------------------------------------------------------------


def test_a_signal_becomes_a_request_and_a_second_one_acts_as_usual(accelerator):
    before = signal.getsignal(signal.SIGTERM)
    before_int = signal.getsignal(signal.SIGINT)  # SIG_IGN where the runner was started in the background
    with GracefulInterrupt() as interrupt:
        assert interrupt.signum is None and interrupt.exit_code == 0 and interrupt.agreed(accelerator) is None
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert interrupt.signum == signal.SIGTERM and interrupt.exit_code == 143
        assert interrupt.agreed(accelerator) == signal.SIGTERM
        # the first signal handed both signals back to their previous handlers
        assert signal.getsignal(signal.SIGTERM) is before
        assert signal.getsignal(signal.SIGINT) is before_int
    assert signal.getsignal(signal.SIGTERM) is before


def test_the_guard_stops_or_skips_nonfinite_steps(accelerator):
    finite = [torch.tensor(1.5), torch.tensor(0.5)]
    guard = NonFiniteGuard(accelerator)
    assert guard.step_is_finite(3, finite, torch.tensor(2.0)) is True
    assert guard.step_is_finite(3, finite, None) is True
    with pytest.raises(NonFiniteTrainingError, match="diverged at step 7: the loss is nan"):
        guard.step_is_finite(7, [torch.tensor(1.0), torch.tensor(float("nan"))], torch.tensor(1.0))
    with pytest.raises(NonFiniteTrainingError, match="step 8: the gradient norm is inf"):
        guard.step_is_finite(8, finite, torch.tensor(float("inf")))

    skipping = NonFiniteGuard(accelerator, on_nonfinite="skip")
    assert skipping.step_is_finite(9, [torch.tensor(float("inf"))], torch.tensor(float("nan"))) is False
    assert skipping.skipped == [9]
    # fp16 gradient scaling owns overflowing gradients
    scaled = NonFiniteGuard(accelerator, check_gradients=False)
    assert scaled.step_is_finite(10, finite, torch.tensor(float("inf"))) is True
    with pytest.raises(ValueError, match="on_nonfinite"):
        NonFiniteGuard(accelerator, on_nonfinite="ignore")


def test_gradient_norm_and_nonfinite_parameters():
    layer = torch.nn.Linear(2, 2)
    assert ckpt.gradient_norm(layer.parameters()) is None
    layer(torch.ones(1, 2)).sum().backward()
    expected = torch.cat([p.grad.flatten() for p in layer.parameters()]).norm()
    assert torch.allclose(ckpt.gradient_norm(layer.parameters()), expected)
    assert ckpt.nonfinite_parameters(layer) == []
    with torch.no_grad():
        layer.bias[1] = float("-inf")
    assert ckpt.nonfinite_parameters(layer) == ["bias"]


def test_first_example_with_valid_depth_uses_the_loss_mask_of_the_configuration():
    import numpy as np

    from modeling_moa_depthclip.losses import DepthLoss

    from tiny_models import tiny_config

    invalid = [{"depth": np.zeros((4, 4))}, {"depth": np.full((4, 4), np.nan)}, {"depth": np.full((4, 4), 20.0)}]
    assert ckpt.first_example_with_valid_depth(invalid, DepthLoss(tiny_config()).valid_mask) is None
    assert ckpt.first_example_with_valid_depth(invalid, DepthLoss(tiny_config(max_depth=25.0)).valid_mask) == 2
    more = invalid + [{"depth": np.full((4, 4), 2.0)}]
    assert ckpt.first_example_with_valid_depth(more, DepthLoss(tiny_config()).valid_mask) == 3


def test_no_code_of_the_package_signals_its_own_process():
    """Fault injection lives in tests/fault_injection.py: nothing in the package (an environment variable included)
    can make a run kill or signal itself."""
    import modeling_moa_depthclip

    package = Path(modeling_moa_depthclip.__file__).parent
    offenders = [str(path.relative_to(package)) for path in package.rglob("*.py")
                 if any(call in path.read_text() for call in ("os.kill(os.getpid()", "signal.raise_signal(", "os.abort(",
                                                        "_KILL_AT"))]
    assert offenders == []
