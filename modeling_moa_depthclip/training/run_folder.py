"""Training state that survives faults: crash-safe checkpoints, one run per output folder, signals, divergence.

Used by `examples/train.py`; everything here works on plain folders and an `accelerate.Accelerator`.

- A checkpoint `checkpoints/step_N/` is complete or invisible: it is written as `checkpoints/step_N.tmp/`, gets a
  `checkpoint_complete.json` (the size of every file) last, and is renamed into place; pruning happens only after
  that. A kill at any moment leaves the previous checkpoints intact.
- `best/` and `final/` are written beside the old folder and swapped in with renames, so a kill never leaves a broken
  model where a good one was; `recover_model_folders` finishes or undoes an interrupted swap.
- `RunLock` admits one training run per output folder; the kernel frees its lock when the holder dies, so a lock
  left by a killed run is taken over.
- `GracefulInterrupt` turns SIGINT/SIGTERM into a request the training loop honours after the current step.
- `NonFiniteGuard` stops (or skips) a step whose loss or gradient is not finite, and `nonfinite_parameters` keeps
  non-finite weights from being saved.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import signal
import socket
import time
from pathlib import Path

import numpy as np
import torch
from accelerate.utils import broadcast_object_list


logger = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"
PROGRESS_FILE = "training_progress.json"
COMPLETE_MARKER = "checkpoint_complete.json"
LOCK_FILE = ".train.lock"
TMP_SUFFIX = ".tmp"
OLD_SUFFIX = ".old"


class CheckpointError(ValueError):
    """A checkpoint that cannot be resumed from (the message names it and why)."""


class OutputDirInUseError(RuntimeError):
    """Another live training run holds the output folder."""


class NonFiniteTrainingError(RuntimeError):
    """Training diverged: a non-finite loss, gradient or weight (the message names the step)."""


# ------------------------------------------------------------------------------------------------
# Progress
# ------------------------------------------------------------------------------------------------


class TrainingProgress:
    """Everything besides model/optimizer/scheduler/RNG that a resumed run needs.

    Kept as JSON beside `accelerate.save_state`'s files rather than registered for checkpointing, which accelerate
    would pickle and unpickle without `weights_only`.
    """

    def __init__(self):
        self.global_step = 0
        self.best_metric: float | None = None
        self.best_step: int | None = None
        self.loss_history: list[list[float]] = []  # [step, loss]
        self.eval_history: list[dict] = []  # {"step", metrics...}
        self.skipped_steps: list[int] = []  # non-finite steps skipped with --on_nonfinite skip
        self.launch: dict | None = None  # processes, per-device batch, accumulation it was saved with

    def state_dict(self) -> dict:
        return {
            "global_step": self.global_step,
            "best_metric": self.best_metric,
            "best_step": self.best_step,
            "loss_history": self.loss_history,
            "eval_history": self.eval_history,
            "skipped_steps": self.skipped_steps,
            "launch": self.launch,
        }

    def load_state_dict(self, state: dict):
        self.global_step = int(state["global_step"])
        self.best_metric = state.get("best_metric")
        self.best_step = state.get("best_step")
        self.loss_history = [list(x) for x in state.get("loss_history", [])]
        self.eval_history = [dict(x) for x in state.get("eval_history", [])]
        self.skipped_steps = [int(x) for x in state.get("skipped_steps", [])]
        self.launch = state.get("launch")

    def save(self, folder: Path):
        _write_text(Path(folder) / PROGRESS_FILE, json.dumps(self.state_dict()) + "\n")

    def load(self, folder: Path):
        path = Path(folder) / PROGRESS_FILE
        try:
            self.load_state_dict(json.loads(path.read_text()))
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise CheckpointError(f"{path}: unreadable training progress ({error})") from None


# ------------------------------------------------------------------------------------------------
# Files
# ------------------------------------------------------------------------------------------------


def _write_text(path: Path, text: str):
    with open(path, "w") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())


def _fsync_tree(folder: Path):
    """Flush every file under `folder` and the folders themselves, so a rename after it publishes durable data."""
    for root, _, files in os.walk(folder):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        _fsync_dir(Path(root))


def _fsync_dir(folder: Path):
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some filesystems cannot sync a directory
        pass
    finally:
        os.close(fd)


def _remove_tree(path: Path):
    """Remove a folder by renaming it out of sight first: a kill mid-removal never leaves a half-deleted `step_N`."""
    if not path.exists():
        return
    doomed = path.with_name(f"{path.name}{OLD_SUFFIX}")
    if doomed.exists():
        shutil.rmtree(doomed)
    os.rename(path, doomed)
    _fsync_dir(path.parent)
    shutil.rmtree(doomed)


def _swap_in(new: Path, target: Path):
    """Put the complete folder `new` at `target`, replacing what is there (see `recover_model_folders`)."""
    old = target.with_name(f"{target.name}{OLD_SUFFIX}")
    if old.exists():
        shutil.rmtree(old)
    if target.exists():
        os.rename(target, old)
    os.rename(new, target)
    _fsync_dir(target.parent)
    if old.exists():
        shutil.rmtree(old)


# ------------------------------------------------------------------------------------------------
# Checkpoints
# ------------------------------------------------------------------------------------------------


def checkpoint_problem(path: Path) -> str | None:
    """None for a complete checkpoint folder, else why it is not one."""
    path = Path(path)
    if not path.is_dir():
        return "no such folder"
    marker = path / COMPLETE_MARKER
    if not marker.is_file():
        return f"not marked complete (no {COMPLETE_MARKER}): its writing was interrupted, or it predates them"
    try:
        files = json.loads(marker.read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return f"{COMPLETE_MARKER} is unreadable"
    for name, size in sorted(files.items()):
        file = path / name
        if not file.is_file():
            return f"{name} is missing"
        if file.stat().st_size != size:
            return f"{name} is {file.stat().st_size} bytes, {size} were written"
    if PROGRESS_FILE not in files:
        return f"no {PROGRESS_FILE}"
    return None


def _step_of(name: str) -> int | None:
    if name.startswith("step_") and name[5:].isdigit():
        return int(name[5:])
    return None


def scan_checkpoints(output_dir: Path) -> tuple[list[tuple[int, Path]], list[tuple[Path, str]]]:
    """(complete checkpoints sorted by step, [(incomplete folder, why)]) under `output_dir/checkpoints`."""
    folder = Path(output_dir) / CHECKPOINTS_DIR
    complete, incomplete = [], []
    if not folder.is_dir():
        return complete, incomplete
    for path in sorted(folder.iterdir()):
        if not path.is_dir():
            continue
        step = _step_of(path.name)
        if step is not None:
            problem = checkpoint_problem(path)
            if problem is None:
                complete.append((step, path))
            else:
                incomplete.append((path, problem))
        elif path.name.endswith(TMP_SUFFIX) and _step_of(path.name[: -len(TMP_SUFFIX)]) is not None:
            incomplete.append((path, "interrupted while being written"))
        elif path.name.endswith(OLD_SUFFIX) and _step_of(path.name[: -len(OLD_SUFFIX)]) is not None:
            incomplete.append((path, "interrupted while being removed"))
    return sorted(complete), incomplete


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """The complete checkpoints under `output_dir/checkpoints`, oldest first, as (step, folder)."""
    return scan_checkpoints(output_dir)[0]


def resolve_resume_checkpoint(output_dir: Path, requested: str | None) -> Path | None:
    """The checkpoint folder `--resume_from_checkpoint` names, or None to start from scratch.

    `latest` takes the newest complete checkpoint of `output_dir` and logs every incomplete one it passed over; a
    named folder must be complete, else `CheckpointError` says why.
    """
    if requested is None:
        return None
    if requested == "latest":
        complete, incomplete = scan_checkpoints(output_dir)
        for path, problem in incomplete:
            logger.warning(f"--resume_from_checkpoint latest: skipping {path}: {problem}")
        if not complete:
            logger.warning(
                f"--resume_from_checkpoint latest: no complete checkpoint in {Path(output_dir) / CHECKPOINTS_DIR}; "
                "starting from scratch"
            )
            return None
        return complete[-1][1]
    path = Path(requested).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such checkpoint folder")
    if not (path / PROGRESS_FILE).is_file() and not (path / COMPLETE_MARKER).is_file():
        raise CheckpointError(f"{path}: not a checkpoint of this script (no {PROGRESS_FILE})")
    problem = checkpoint_problem(path)
    if problem is not None:
        complete = list_checkpoints(path.parent.parent) if path.parent.name == CHECKPOINTS_DIR else []
        hint = f"; the newest complete one is {complete[-1][1]}" if complete else ""
        raise CheckpointError(f"{path} is an incomplete checkpoint: {problem}{hint}")
    return path


def save_checkpoint(accelerator, output_dir: Path, step: int, progress: TrainingProgress, total_limit: int = 0) -> Path:
    """`accelerator.save_state` + progress into `checkpoints/step_N`, complete or invisible; then prune.

    All processes call it (each saves its RNG state). Only after `step_N` is complete are older checkpoints beyond
    `total_limit` (0: keep all) removed.
    """
    folder = Path(output_dir) / CHECKPOINTS_DIR
    final = folder / f"step_{step}"
    tmp = folder / f"step_{step}{TMP_SUFFIX}"
    if accelerator.is_main_process:
        folder.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left by a killed run
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        progress.save(tmp)
        _fsync_tree(tmp)
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        _write_text(tmp / COMPLETE_MARKER, json.dumps({"step": step, "files": files}, indent=1) + "\n")
        _fsync_dir(tmp)
        _swap_in(tmp, final)
        if total_limit > 0:
            prune_checkpoints(output_dir, total_limit)
    accelerator.wait_for_everyone()
    return final


def prune_checkpoints(output_dir: Path, keep: int):
    """Keep the newest `keep` complete checkpoints; remove older ones and leftovers of interrupted writes/removals.

    Incomplete `step_N` folders that this code did not leave (it never leaves one) are kept for the user to inspect.
    """
    complete, incomplete = scan_checkpoints(output_dir)
    if not complete:
        return
    for _, path in complete[:-keep]:
        _remove_tree(path)
    for path, _ in incomplete:
        if path.name.endswith((TMP_SUFFIX, OLD_SUFFIX)):
            shutil.rmtree(path, ignore_errors=True)


# ------------------------------------------------------------------------------------------------
# Model folders (best/, final/)
# ------------------------------------------------------------------------------------------------


def nonfinite_parameters(model) -> list[str]:
    """Names of the parameters holding a NaN or an infinity."""
    named = list(model.named_parameters())
    if not named:
        return []
    finite = torch.stack([torch.isfinite(p.detach()).all() for _, p in named]).cpu().tolist()
    return [name for (name, _), ok in zip(named, finite) if not ok]


def save_model_folder(accelerator, model, image_processor, folder: Path, extra: dict | None = None):
    """`save_pretrained` model + image processor into `folder`, swapped in only once complete.

    Refuses (NonFiniteTrainingError) to save weights with a NaN or infinity; an existing `folder` stays until the
    new one is complete.
    """
    folder = Path(folder)
    unwrapped = accelerator.unwrap_model(model)
    bad = nonfinite_parameters(unwrapped)
    if bad:
        step = f" at step {extra['step']}" if extra and "step" in extra else ""
        raise NonFiniteTrainingError(
            f"not saving {folder}{step}: {len(bad)} parameter(s) hold NaN or infinity (first: {bad[0]})"
        )
    state_dict = accelerator.get_state_dict(model)
    if accelerator.is_main_process:
        tmp = folder.with_name(f"{folder.name}{TMP_SUFFIX}")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        unwrapped.save_pretrained(tmp, state_dict=state_dict)
        image_processor.save_pretrained(tmp)
        if extra is not None:
            (tmp / "training_info.json").write_text(json.dumps(extra, indent=2) + "\n")
        _fsync_tree(tmp)
        _swap_in(tmp, folder)
    accelerator.wait_for_everyone()


def recover_model_folders(output_dir: Path, names=("best", "final")) -> list[str]:
    """Finish or undo a swap of `best/` / `final/` that a kill interrupted; returns what was done, for the log.

    A kill can only leave: `NAME.tmp` (a new folder not yet swapped in: dropped), `NAME.old` beside `NAME` (the swap
    happened: the old one is dropped), or `NAME.old` alone (killed between the two renames: it is put back).
    """
    notes = []
    for name in names:
        target = Path(output_dir) / name
        tmp = target.with_name(f"{name}{TMP_SUFFIX}")
        old = target.with_name(f"{name}{OLD_SUFFIX}")
        if tmp.exists():
            shutil.rmtree(tmp)
            notes.append(f"removed {tmp} (an interrupted write of {name}/)")
        if old.exists():
            if target.exists():
                shutil.rmtree(old)
            else:
                os.rename(old, target)
                notes.append(f"restored {target} (a kill interrupted its replacement)")
    return notes


# ------------------------------------------------------------------------------------------------
# One run per output folder
# ------------------------------------------------------------------------------------------------


def _process_start_time(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """An exclusive lock on a training output folder (`output_dir/.train.lock`), held by the main process.

    The lock is an `fcntl.flock` on the file, which the kernel drops when its holder dies (SIGKILL included), so a
    lock file left by a killed run is taken over. The file records the holder (pid, host, start) for the messages.
    Where the filesystem has no flock, the recorded holder decides: a dead pid on this host is taken over.
    """

    def __init__(self, output_dir: Path):
        self.path = Path(output_dir) / LOCK_FILE
        self._fd: int | None = None
        self.previous: dict | None = None  # the holder recorded by a run that died without releasing

    def _read_holder(self) -> dict | None:
        try:
            return json.loads(self.path.read_text() or "null")
        except (OSError, ValueError):
            return None

    def _holder_alive(self, holder: dict | None) -> bool:
        """Whether a recorded holder may still be running (flock unavailable)."""
        if not holder or "pid" not in holder:
            return False
        if holder.get("host") != socket.gethostname():
            return True  # cannot tell from here
        pid = int(holder["pid"])
        if not _pid_alive(pid):
            return False
        started = holder.get("start_ticks")
        return started is None or _process_start_time(pid) in (None, started)

    @staticmethod
    def describe(holder: dict | None) -> str:
        if not holder:
            return "another run"
        since = holder.get("started")
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "?"
        return f"pid {holder.get('pid')} on {holder.get('host')}, since {since}"

    def acquire(self):
        import fcntl  # POSIX only: imported where the lock is taken

        self.path.parent.mkdir(parents=True, exist_ok=True)
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as error:
                os.close(fd)
                if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise OutputDirInUseError(
                        f"{self.path.parent} is in use by another training run ({self.describe(self._read_holder())}); "
                        f"wait for it to end or choose another --output_dir"
                    ) from None
                if error.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                    raise
                return self._acquire_by_pid()
            # the file may have been removed by its previous holder between our open and flock: lock the path's file
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if not same:
                os.close(fd)
                continue
            self._fd = fd
            break
        holder = self._read_holder()
        if holder and holder.get("pid"):
            self.previous = holder
            logger.warning(
                f"{self.path}: taking over the lock of an earlier run that ended without releasing it "
                f"({self.describe(holder)})"
            )
        self._write_holder()
        return self

    def _acquire_by_pid(self):
        """Lock by the recorded holder alone (filesystems without flock): create exclusively, else judge the pid."""
        while True:
            try:
                self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                self._write_holder()
                return self
            except FileExistsError:
                holder = self._read_holder()
                if self._holder_alive(holder):
                    raise OutputDirInUseError(
                        f"{self.path.parent} is in use by another training run ({self.describe(holder)}); "
                        f"wait for it to end, choose another --output_dir, or delete {self.path} if no run uses it"
                    ) from None
                self.previous = holder
                logger.warning(f"{self.path}: taking over the lock of a run that is gone ({self.describe(holder)})")
                try:
                    os.unlink(self.path)
                except FileNotFoundError:
                    pass

    def _write_holder(self):
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.time(),
                  "start_ticks": _process_start_time(os.getpid())}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(record) + "\n").encode(), 0)
        os.fsync(self._fd)

    def release(self):
        if self._fd is None:
            return
        try:
            os.unlink(self.path)  # before unlocking: a waiting run then re-opens a fresh file (see acquire)
        except FileNotFoundError:
            pass
        os.close(self._fd)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def lock_holder(output_dir: Path) -> dict | None:
    """The live run holding `output_dir`'s lock (its record, or {} if unrecorded), else None; takes nothing.

    A shared, non-blocking probe: any number of processes of one launch may ask at once.
    """
    lock = RunLock(output_dir)
    if not lock.path.is_file():
        return None
    try:
        import fcntl  # POSIX only: imported where the lock is taken
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(lock.path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as error:
        if error.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return lock._read_holder() or {}
        holder = lock._read_holder()  # no flock on this filesystem: judge the recorded pid
        return holder if lock._holder_alive(holder) else None
    finally:
        os.close(fd)
    return None


def earlier_outputs(output_dir: Path, resume_path: Path | None) -> list[str]:
    """What a run starting (or resuming from `resume_path`) in `output_dir` would replace of an earlier run.

    From scratch: its complete checkpoints, `best/` and `final/`; when resuming: the checkpoints newer than the one
    resumed (another branch of the run, which `latest` would otherwise pick later).
    """
    output_dir = Path(output_dir)
    checkpoints = list_checkpoints(output_dir)
    if resume_path is not None:
        resumed = _step_of(Path(resume_path).name)
        return [str(path) for step, path in checkpoints if resumed is not None and step > resumed]
    found = [str(path) for _, path in checkpoints]
    return found + [str(output_dir / name) for name in ("best", "final") if (output_dir / name).is_dir()]


def acquire_run_lock(accelerator, output_dir: Path) -> RunLock | None:
    """The main process locks `output_dir`; every process raises OutputDirInUseError if that failed.

    Other processes take no lock (they write only inside the main process's folders), and learn the outcome by a
    broadcast, so none of them waits for a main process that has already given up.
    """
    lock, message = None, None
    if accelerator.is_main_process:
        try:
            lock = RunLock(output_dir).acquire()
        except OutputDirInUseError as error:
            message = str(error)
    if accelerator.num_processes > 1:
        message = broadcast_object_list([message])[0]
    if message is not None:
        raise OutputDirInUseError(message)
    return lock


def start_run(accelerator, output_dir: Path, resume_path: Path | None, overwrite: bool) -> RunLock | None:
    """Lock `output_dir`, repair what a kill left of `best/`/`final/`, and (with `overwrite`) remove what this run
    replaces of an earlier one (see `earlier_outputs`). Returns the lock (None on other processes)."""
    lock = acquire_run_lock(accelerator, output_dir)
    if accelerator.is_main_process:
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        for note in recover_model_folders(output_dir):
            logger.warning(note)
        if overwrite:
            for path in earlier_outputs(output_dir, resume_path):
                logger.info(f"--overwrite_output_dir: removing {path}")
                _remove_tree(Path(path))
    accelerator.wait_for_everyone()
    return lock


# ------------------------------------------------------------------------------------------------
# Signals
# ------------------------------------------------------------------------------------------------


class GracefulInterrupt:
    """SIGINT/SIGTERM become a request (`signum`) that the training loop honours after the current step.

    A second SIGINT/SIGTERM acts as usual (KeyboardInterrupt / termination), for a user who will not wait.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self):
        for signum in self.SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread: signals stay as they are
                pass
        return self

    def _handle(self, signum, frame):
        self.signum = signum
        for other, previous in self._previous.items():
            signal.signal(other, previous if previous is not None else signal.SIG_DFL)
        logger.warning(
            f"{signal.Signals(signum).name} received: finishing the current step, then saving a checkpoint "
            "(send it again to stop at once, without one)"
        )

    def restore(self):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous if previous is not None else signal.SIG_DFL)
        self._previous = {}

    @property
    def exit_code(self) -> int:
        return 128 + int(self.signum) if self.signum is not None else 0

    def agreed(self, accelerator) -> int | None:
        """The signal any process has received (every process gets the same answer: one collective)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([float(self.signum or 0)], device=accelerator.device)
        return int(accelerator.gather(flag).max()) or None

    def __enter__(self):
        return self.install()

    def __exit__(self, *exc):
        self.restore()


# ------------------------------------------------------------------------------------------------
# Divergence
# ------------------------------------------------------------------------------------------------


class NonFiniteGuard:
    """Decides, once per optimizer step and identically on every process, whether the step may update the weights.

    `on_nonfinite="error"` raises NonFiniteTrainingError naming the step; `"skip"` drops that update (the gradient
    is zeroed, the step still counts). `check_loss` with fp16 gradient scaling leaves overflowing gradients to the
    scaler, which skips those steps itself.
    """

    def __init__(self, accelerator, on_nonfinite: str = "error", check_gradients: bool = True):
        if on_nonfinite not in ("error", "skip"):
            raise ValueError(f"on_nonfinite must be 'error' or 'skip', got {on_nonfinite!r}")
        self.accelerator, self.on_nonfinite, self.check_gradients = accelerator, on_nonfinite, check_gradients
        self.skipped: list[int] = []

    def step_is_finite(self, step: int, losses: list[torch.Tensor], grad_norm: torch.Tensor | float | None) -> bool:
        """Whether step `step` may update the weights (the same answer on every process: one collective).

        `losses`: this process's micro-batch losses of the step; `grad_norm`: the total gradient norm (or None).
        """
        device = self.accelerator.device
        loss = torch.stack([x.detach().float().reshape(()) for x in losses]).to(device)
        bad_loss = (~torch.isfinite(loss)).any()
        bad_grad = torch.zeros((), dtype=torch.bool, device=device)
        if self.check_gradients and grad_norm is not None:
            bad_grad = ~torch.isfinite(torch.as_tensor(grad_norm, device=device).float())
        flags = torch.stack([bad_loss, bad_grad]).float()
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.gather(flags.reshape(1, -1)).amax(dim=0)
        bad_loss, bad_grad = bool(flags[0]), bool(flags[1])
        if not (bad_loss or bad_grad):
            return True
        what = " and ".join(
            part for part, bad in (
                (f"the loss is {_describe(loss)}", bad_loss), (f"the gradient norm is {_describe(grad_norm)}", bad_grad)
            ) if bad
        )
        if self.on_nonfinite == "error":
            raise NonFiniteTrainingError(
                f"training diverged at step {step}: {what}; the weights of step {step - 1} were kept and nothing of "
                f"step {step} was saved (lower --learning_rate, or pass --on_nonfinite skip to skip such steps)"
            )
        self.skipped.append(step)
        logger.warning(f"step {step}: {what}; update skipped (--on_nonfinite skip; {len(self.skipped)} skipped so far)")
        return False


def _describe(value) -> str:
    if value is None:
        return "unknown"
    values = torch.as_tensor(value).detach().float().flatten().cpu()
    bad = values[~torch.isfinite(values)]
    return f"{bad[0].item()}" if len(bad) else f"{values.max().item():g}"


def gradient_norm(parameters) -> torch.Tensor | None:
    """Total L2 norm of the gradients of `parameters` (None if none has one); read only, weights untouched."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return None
    return torch.nn.utils.get_total_norm(grads)


def first_example_with_valid_depth(dataset, valid_mask) -> int | None:
    """Index of the first example with a depth pixel that `valid_mask` (e.g. the model's `depth_loss.valid_mask`)
    accepts; None if none has.

    Stops at the first hit, so a normal dataset costs one example; only a dataset without any valid pixel is read
    in full.
    """
    for index in range(len(dataset)):
        depth = torch.from_numpy(np.asarray(dataset[index]["depth"], dtype=np.float32))
        if valid_mask(depth[None]).any():
            return index
    return None


__all__ = [
    "CheckpointError",
    "GracefulInterrupt",
    "NonFiniteGuard",
    "NonFiniteTrainingError",
    "OutputDirInUseError",
    "RunLock",
    "TrainingProgress",
    "acquire_run_lock",
    "earlier_outputs",
    "lock_holder",
    "start_run",
    "checkpoint_problem",
    "first_example_with_valid_depth",
    "gradient_norm",
    "list_checkpoints",
    "nonfinite_parameters",
    "prune_checkpoints",
    "recover_model_folders",
    "resolve_resume_checkpoint",
    "save_checkpoint",
    "save_model_folder",
    "scan_checkpoints",
]
