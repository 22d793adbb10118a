"""examples/train.py under faults: kills, signals, a second run, divergence, data without depth, broken models.

The fault-injection test kills real training processes (tiny configuration, synthetic 48x64 scenes) at chosen
points, reached through tests/fault_injection.py (a wrapper that patches the run folder's functions; the library has
no hook), resumes each time with `--resume_from_checkpoint latest`, and requires the result to equal an
uninterrupted run bit for bit.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from modeling_moa_depthclip.training.run_folder import LOCK_FILE, list_checkpoints

from fault_injection import fault_patches

from test_train_evaluate import ACCELERATE, EXAMPLES, _error_of, _subprocess_env, one_thread, run_train, train_script  # noqa: F401


COMMON = (
    "--config_name", "tiny", "--max_train_samples", 6, "--synthetic_size", 48, 64, "--per_device_train_batch_size", 2,
    "--max_train_steps", 8, "--learning_rate", 1e-3, "--seed", 5, "--max_eval_samples", 2, "--eval_steps", 3,
    "--test_datasets", "none", "--checkpointing_steps", 2, "--checkpoints_total_limit", 2, "--report_to", "none",
)


def _train_process(output_dir: Path, *extra, kill_at: str | None = None) -> subprocess.CompletedProcess:
    script = [str(Path(__file__).with_name("fault_injection.py")), kill_at] if kill_at else [str(EXAMPLES / "train.py")]
    command = [sys.executable, *script, *map(str, COMMON), "--output_dir", str(output_dir), *extra]
    return subprocess.run(command, env=_subprocess_env(), capture_output=True, text=True, timeout=300)


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def _assert_same_weights(a: Path, b: Path):
    first, second = load_file(a / "model.safetensors"), load_file(b / "model.safetensors")
    assert first.keys() == second.keys()
    changed = [k for k in first if not torch.equal(first[k], second[k])]
    assert not changed, changed


def test_killed_at_any_moment_and_resumed_with_latest_ends_bit_for_bit_like_an_uninterrupted_run(run_train, tmp_path):
    """8 steps (3 per epoch, evaluation at 3, 6, 8, checkpoints every 2 steps, the last 2 kept), interrupted four
    times: SIGKILL while best/ is written (step 3), SIGKILL while a checkpoint is written (step 4), SIGTERM (step 5:
    the step finishes, a checkpoint is written, exit 143 with the resume command), SIGKILL after a new checkpoint
    is complete but before the old ones are pruned (step 6); each time `--resume_from_checkpoint latest` continues.
    best/ and final/ equal those of an uninterrupted run, bit for bit."""
    straight = run_train(*COMMON, "--output_dir", tmp_path / "straight")
    out = tmp_path / "faults"
    checkpoints = out / "checkpoints"

    killed = _train_process(out, kill_at="best:3")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _entries(checkpoints) == ["step_2"] and (out / "best.tmp").is_dir() and not (out / "best").exists()
    assert (out / LOCK_FILE).is_file()  # a killed run cannot release its lock

    killed = _train_process(out, "--resume_from_checkpoint", "latest", kill_at="checkpoint:4")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert "taking over the lock" in killed.stderr and f"resumed from {checkpoints / 'step_2'}" in killed.stderr
    assert _entries(checkpoints) == ["step_2", "step_4.tmp"] and _entries(out / "best") and not (out / "best.tmp").exists()

    stopped = _train_process(out, "--resume_from_checkpoint", "latest", kill_at="step:5:SIGTERM")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-2000:]
    assert f"skipping {checkpoints / 'step_4.tmp'}: interrupted while being written" in stopped.stderr
    assert f"resumed from {checkpoints / 'step_2'}" in stopped.stderr
    assert "Stopped by SIGTERM after step 5" in stopped.stderr
    resume_line = stopped.stderr.strip().splitlines()[-1]
    assert resume_line.endswith("--resume_from_checkpoint latest") and f"--output_dir {out}" in resume_line
    assert _entries(checkpoints) == ["step_4", "step_5"] and not (out / LOCK_FILE).exists()

    killed = _train_process(out, "--resume_from_checkpoint", "latest", kill_at="prune:6")
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert _entries(checkpoints) == ["step_4", "step_5", "step_6"]

    finished = _train_process(out, "--resume_from_checkpoint", "latest")
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert f"resumed from {checkpoints / 'step_6'}" in finished.stderr
    assert _entries(checkpoints) == ["step_6", "step_8"] == [p.name for _, p in list_checkpoints(out)]
    assert _entries(out) == _entries(tmp_path / "straight")  # no leftovers, no lock

    _assert_same_weights(out / "final", tmp_path / "straight" / "final")
    _assert_same_weights(out / "best", tmp_path / "straight" / "best")
    progress = json.loads((checkpoints / "step_8" / "training_progress.json").read_text())
    assert progress["loss_history"] == straight["loss_history"]
    assert progress["eval_history"] == straight["eval_history"] and len(straight["eval_history"]) == 3
    # the weights did train, so the equality is not trivial
    assert straight["loss_history"][0][1] != straight["loss_history"][-1][1]


HOLDER = """
import sys, time
sys.path.insert(0, sys.argv[2])
from modeling_moa_depthclip.training.run_folder import RunLock
lock = RunLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_one_run_per_output_folder_and_nothing_of_an_earlier_run_is_replaced_unasked(run_train, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*COMMON[:COMMON.index("--max_train_steps")], "--max_train_steps", 2, "--eval_split", "none",
            "--test_datasets", "none", "--checkpointing_steps", 1, "--report_to", "none", "--output_dir", out]
    run_train(*args)
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}

    # a live run holds the folder: refused in one line naming it, before anything is written
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(EXAMPLES.parent)], stdout=subprocess.PIPE,
                              text=True, env=_subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        message = _error_of(train_script.main, [*args, "--resume_from_checkpoint", "latest"], capsys)
        assert f"--output_dir: {out} is in use by another training run (pid {holder.pid}" in message
    finally:
        holder.kill()
        holder.wait()
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK_FILE} == before

    # a fresh run into a finished run's folder is refused (its checkpoints and final/ would go)
    message = _error_of(train_script.main, args, capsys)
    assert "holds an earlier run (checkpoints/step_1, checkpoints/step_2, final)" in message
    assert "--resume_from_checkpoint latest" in message and "--overwrite_output_dir" in message
    # resuming from an older checkpoint would replace the newer one: refused too
    message = _error_of(train_script.main, [*args, "--resume_from_checkpoint", out / "checkpoints" / "step_1"], capsys)
    assert "holds newer checkpoints (checkpoints/step_2)" in message
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name != LOCK_FILE} == before
    # naming a checkpoint whose writing was cut short: refused, naming it, why, and the one to use
    (out / "checkpoints" / "step_3").mkdir()
    (out / "checkpoints" / "step_3" / "training_progress.json").write_text("{}")
    message = _error_of(train_script.main, [*args, "--resume_from_checkpoint", out / "checkpoints" / "step_3"], capsys)
    assert message.endswith(
        f"--resume_from_checkpoint: {out / 'checkpoints' / 'step_3'} is an incomplete checkpoint: not marked complete "
        f"(no checkpoint_complete.json): its writing was interrupted, or it predates them; the newest complete one "
        f"is {out / 'checkpoints' / 'step_2'}"
    ), message
    (out / "checkpoints" / "step_3" / "training_progress.json").unlink()
    (out / "checkpoints" / "step_3").rmdir()

    # asked: it replaces them
    summary = run_train(*args, "--overwrite_output_dir", "--max_train_steps", 1)
    assert summary["global_step"] == 1
    assert [p.name for _, p in list_checkpoints(out)] == ["step_1"]
    assert json.loads((out / "final" / "training_info.json").read_text())["step"] == 1


def test_two_processes_refused_together_without_hanging(tmp_path):
    """Under `accelerate launch` with 2 processes only the main process takes the lock, and when the folder is in
    use the processes stop with the one-line error (none waits for the other)."""
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(out), str(EXAMPLES.parent)], stdout=subprocess.PIPE,
                              text=True, env=_subprocess_env())
    try:
        assert holder.stdout.readline().strip() == "locked"
        launch = [str(ACCELERATE), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                  "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
        refused = subprocess.run([*launch, str(EXAMPLES / "train.py"), *map(str, COMMON), "--output_dir", str(out)],
                                 env=_subprocess_env(), capture_output=True, text=True, timeout=240)
    finally:
        holder.kill()
        holder.wait()
    assert refused.returncode != 0
    # each rank stops on its own; the launcher may terminate the second before it prints, so 1 or 2 lines
    errors = [line for line in refused.stderr.splitlines() if "is in use by another training run" in line]
    assert 1 <= len(errors) <= 2 and all(f"(pid {holder.pid} on" in line for line in errors), refused.stderr[-3000:]
    assert _entries(out) == [LOCK_FILE]


def test_a_signal_stops_after_the_step_with_a_checkpoint_and_exit_code_130(run_train, tmp_path, monkeypatch, capsys):
    for owner, name, replacement in fault_patches("step:2:SIGINT"):
        monkeypatch.setattr(owner, name, replacement)
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN where the runner was started in the background
    with pytest.raises(SystemExit) as exit_info:
        run_train(*COMMON, "--output_dir", tmp_path / "run")
    assert exit_info.value.code == 130
    assert [p.name for _, p in list_checkpoints(tmp_path / "run")] == ["step_2"]
    assert not (tmp_path / "run" / "final").exists() and not (tmp_path / "run" / LOCK_FILE).exists()
    err = capsys.readouterr().err
    assert "Stopped by SIGINT after step 2" in err and err.strip().endswith("--resume_from_checkpoint latest")
    assert signal.getsignal(signal.SIGINT) is before  # handlers restored


def test_divergence_stops_naming_the_step_or_is_skipped_and_never_saved(run_train, tmp_path, capsys):
    diverging = ("--learning_rate", 1e8, "--backbone_learning_rate", 1e8, "--max_train_steps", 5, "--eval_steps", 1,
                 "--checkpointing_steps", 1, "--checkpoints_total_limit", 0)  # overriding COMMON's
    with pytest.raises(SystemExit) as exit_info:
        run_train(*COMMON, *diverging, "--output_dir", tmp_path / "error")
    assert exit_info.value.code == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert message.startswith("train.py: error: training diverged at step 2: the loss is nan"), message
    out = tmp_path / "error"
    assert not (out / "final").exists() and not (out / LOCK_FILE).exists()
    assert [p.name for _, p in list_checkpoints(out)] == ["step_1"]  # step 1 was still finite
    assert json.loads((out / "best" / "training_info.json").read_text())["step"] == 1

    summary = run_train(*COMMON, *diverging, "--on_nonfinite", "skip", "--output_dir", tmp_path / "skip")
    assert summary["global_step"] == 5 and summary["skipped_steps"] == [2, 3, 4, 5]
    final = load_file(tmp_path / "skip" / "final" / "model.safetensors")
    assert all(torch.isfinite(v).all() for v in final.values())
    _assert_same_weights(tmp_path / "skip" / "final", tmp_path / "skip" / "checkpoints" / "step_1")

    assert "--learning_rate: expected a positive finite number, got inf" in _error_of(
        train_script.main, ["--learning_rate", "inf"], capsys
    )


def test_a_training_set_without_valid_depth_fails_before_the_first_step(tmp_path, capsys):
    from PIL import Image

    data = tmp_path / "no_depth"
    (data / "frames").mkdir(parents=True)
    rows = []
    for i in range(3):
        Image.fromarray(np.full((48, 64, 3), 60 * i, np.uint8)).save(data / "frames" / f"{i}_rgb.png")
        Image.fromarray(np.zeros((48, 64), np.uint16)).save(data / "frames" / f"{i}_depth.png")
        rows.append(f"frames/{i}_rgb.png,frames/{i}_depth.png")
    (data / "index.csv").write_text("\n".join(rows) + "\n")
    message = _error_of(train_script.main, ["--config_name", "tiny", "--dataset", data, "--eval_split", "none",
                                            "--test_datasets", "none", "--output_dir", tmp_path / "out"], capsys)
    assert f"--dataset: {data}: none of the 3 training examples has a valid depth pixel" in message
    assert "(0.001, 10] m" in message
    assert not (tmp_path / "out" / "final").exists()


def test_a_broken_model_folder_fails_in_one_line_naming_the_file(tmp_path, capsys):
    from tiny_models import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    message = _error_of(train_script.main, ["--model", tmp_path / "model", "--output_dir", tmp_path / "out"], capsys)
    assert "--model" in message and f"{weights}: cannot read the weights" in message and "truncated" in message
    weights.unlink()
    message = _error_of(train_script.main, ["--model", tmp_path / "model", "--output_dir", tmp_path / "out"], capsys)
    assert "--model" in message and "model.safetensors" in message and str(tmp_path / "model") in message


# ------------------------------------------------------------------------------------------------
# Launch and resume say what they do
# ------------------------------------------------------------------------------------------------


def test_the_launchers_process_count_is_read_from_its_command_line():
    from modeling_moa_depthclip.training.launch import launch_shortfall, requested_num_processes

    launcher = ["/venv/bin/python", "/venv/bin/accelerate", "launch"]
    assert requested_num_processes([*launcher, "--cpu", "--num_processes", "2", "train.py", "--seed", "1"]) == 2
    assert requested_num_processes([*launcher, "--num-processes=3", "--multi_gpu", "train.py"]) == 3
    assert requested_num_processes(["/venv/bin/python", "train.py", "--num_processes", "2"]) is None
    assert launch_shortfall(2, 2) is None and launch_shortfall(1, None) is None
    message = launch_shortfall(1, 2)
    assert "\n" not in message and "asked for 2 processes but started 1" in message


def test_a_launch_that_starts_fewer_processes_than_asked_says_so(tmp_path):
    """accelerate's CPU launcher starts one process for `--num_processes 2`: the run says so in one line."""
    out = tmp_path / "run"
    short = [*COMMON[:COMMON.index("--max_train_steps")], "--max_train_steps", 1, "--eval_split", "none",
             "--test_datasets", "none", "--checkpointing_steps", 0, "--report_to", "none", "--output_dir", out]
    launched = subprocess.run(
        [str(ACCELERATE), "launch", "--cpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
         "--dynamo_backend", "no", str(EXAMPLES / "train.py"), *map(str, short)],
        env=_subprocess_env(), capture_output=True, text=True, timeout=300,
    )
    assert launched.returncode == 0, launched.stderr[-3000:]
    lines = [line for line in launched.stderr.splitlines() if "accelerate launch was asked for" in line]
    assert len(lines) == 1 and "asked for 2 processes but started 1" in lines[0], launched.stderr[-3000:]
    assert "x 1 process(es)" in launched.stderr


def test_resuming_with_another_batch_size_says_the_run_is_not_exact(run_train, tmp_path, capsys):
    out = tmp_path / "run"
    args = [*COMMON[:COMMON.index("--max_train_steps")], "--max_train_steps", 3, "--stop_after_steps", 1,
            "--eval_split", "none", "--test_datasets", "none", "--report_to", "none", "--output_dir", out]
    run_train(*args)
    assert "another setup" not in capsys.readouterr().err
    # the same setup resumes without a word
    run_train(*args, "--stop_after_steps", 2, "--resume_from_checkpoint", "latest")
    assert "another setup" not in capsys.readouterr().err
    run_train(*args, "--resume_from_checkpoint", "latest", "--per_device_train_batch_size", 3)
    lines = [line for line in capsys.readouterr().err.splitlines() if "another setup" in line]
    assert len(lines) == 1, lines
    assert "per-device batch 2 -> 3" in lines[0] and "not an exact continuation" in lines[0]
    assert "processes" not in lines[0]  # only what changed is named
