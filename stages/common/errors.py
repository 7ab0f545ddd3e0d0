"""One exception type per cause, each with the exit code a stage ends with.

Stages raise these with a message that names the file/key/value and the fix; `run_main` turns
them into one line on stderr and the exit code, so a user (or a scheduler) never has to read a
traceback to learn what went wrong.
"""

from __future__ import annotations

import contextlib
import errno
import importlib.abc
import importlib.machinery
import importlib.util
import os
import signal
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Iterator
from pathlib import Path
from types import FrameType

# Set to 1 to see the traceback behind an unexpected error (it is one line otherwise).
TRACEBACK_ENV = "CIFAR10_PIPELINE_TRACEBACK"
# The shell's code for a process stopped by SIGINT (128 + 2), whichever signal stopped it here.
INTERRUPTED = 130
# A command line that cannot be parsed (an unknown option, a bad value): the code Click and
# argparse use for it.
USAGE = 2


class PipelineError(Exception):
    exit_code = 1


class ConfigError(PipelineError):
    """params.yaml is malformed, incomplete or out of range."""

    exit_code = 2


class DataError(PipelineError):
    """Input data is missing, in an unknown layout, or fails validation."""

    exit_code = 3


class IntegrityError(PipelineError):
    """Checksum mismatch, corrupt archive."""

    exit_code = 4


class TrainingDiverged(PipelineError):
    exit_code = 5


class TransientError(PipelineError):
    """Worth retrying: network, lock busy, disk full."""

    exit_code = 75


class StageFailed(PipelineError):
    """A stage's command failed; the message is the stage's own error line, the exit code its own
    (1 when it had none: killed, timed out)."""

    def __init__(self, stage: str, message: str, stage_exit_code: int | None):
        super().__init__(f"{stage} failed: {message}")
        self.stage, self.detail, self.stage_exit_code = stage, message, stage_exit_code
        self.exit_code = stage_exit_code if stage_exit_code and stage_exit_code > 0 else 1

    @property
    def transient(self) -> bool:
        return self.stage_exit_code == TransientError.exit_code


class CommandFailed(PipelineError):
    """A dvc or git command the pipeline relies on failed; the message is its own error line."""


def describe_unexpected(err: BaseException) -> tuple[str, int]:
    """One line and an exit code for an error no stage or command anticipated.

    Out-of-memory and permission problems are named with their fix; anything else says what it
    was and how to see the traceback.
    """
    name = type(err).__name__
    if isinstance(err, MemoryError) or name == "ResourceExhaustedError":
        return (("out of memory; lower train.batch_size (or evaluate.batch_size), or use a machine with more "
                "memory"), ConfigError.exit_code)
    if isinstance(err, PermissionError):
        return f"permission denied: {err.filename or err}; fix the file's permissions or run as its owner", 1
    if isinstance(err, OSError) and err.errno == errno.ENOSPC:
        return f"disk full while writing {err.filename or 'a file'}; free space and rerun", TransientError.exit_code
    return f"unexpected {name}: {err}; rerun with {TRACEBACK_ENV}=1 to see the traceback", 1


def report_unexpected(err: BaseException) -> int:
    """Print the one-line error (and the traceback when asked); return the exit code."""
    if os.environ.get(TRACEBACK_ENV):
        traceback.print_exception(err)
    message, code = describe_unexpected(err)
    print(f"error: {message}", file=sys.stderr)
    return code


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


# The signals that stop a command as Ctrl-C (SIGINT) does: service managers, CI runners and
# container runtimes send SIGTERM; a closed terminal or SSH session sends SIGHUP.
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


def stop_signals_to_handle() -> list[signal.Signals]:
    """The stop signals not ignored on purpose (`nohup` ignores SIGHUP, a background job SIGINT)."""
    return [signum for signum in STOP_SIGNALS if signal.getsignal(signum) is not signal.SIG_IGN]


def interrupt_on_sigterm() -> None:
    """SIGTERM and SIGHUP raise KeyboardInterrupt, as Ctrl-C does, so the command cleans up and ends
    as an interrupted one does (unless the signal is ignored on purpose, as under `nohup`)."""
    for signum in stop_signals_to_handle():
        if signum != signal.SIGINT:
            signal.signal(signum, _interrupt)


# The stage's own stderr, kept aside: native_stderr_silenced points file descriptor 2 elsewhere
# for a while, and a stop in that while must still be heard.
STDERR_FD = os.dup(2)


def exit_quietly_when_interrupted(message: str) -> None:
    """Until `run_main` takes over: a stop (STOP_SIGNALS) while a stage still imports its
    libraries ends it at once with its one line, not with a traceback from inside an import."""

    def stop(signum: int, frame: FrameType | None) -> None:
        os.write(STDERR_FD, f"error: {message}\n".encode())
        os._exit(INTERRUPTED)  # nothing is written yet; unwinding an import would only print noise

    for signum in stop_signals_to_handle():
        signal.signal(signum, stop)


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """File descriptor 2 to /dev/null for the block. TensorFlow logs through absl from C++ as it
    loads and probes devices (CUDA stubs, CPU features, cuInit), before it reads
    TF_CPP_MIN_LOG_LEVEL: on a machine without a GPU every stage would start with that noise.
    Python's own errors are raised after the block, so they are still seen."""
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, inner: importlib.abc.Loader) -> None:
        self.inner = inner

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> types.ModuleType | None:
        return self.inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        with native_stderr_silenced():
            self.inner.exec_module(module)
            if module.__name__ == "tensorflow":  # its first device probe logs cuInit's failure on a CPU machine
                module.config.list_physical_devices("GPU")


class QuietImport(importlib.abc.MetaPathFinder):
    """Imports the named package, the first time, with native stderr silenced."""

    def __init__(self, name: str) -> None:
        self.name = name

    def find_spec(self, fullname: str, path: object, target: object = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def import_tensorflow_quietly() -> None:
    """However a stage comes to import TensorFlow (directly, or through Keras), quietly."""
    if "tensorflow" not in sys.modules and not any(isinstance(f, QuietImport) for f in sys.meta_path):
        sys.meta_path.insert(0, QuietImport("tensorflow"))


def error_exit(err: BaseException, interrupted: str = "interrupted") -> int:
    """The one boundary of every command and stage: one line on stderr for `err`, and its exit code."""
    if isinstance(err, PipelineError):
        print(f"error: {err}", file=sys.stderr)
        return err.exit_code
    if isinstance(err, KeyboardInterrupt):
        print(f"error: {interrupted}", file=sys.stderr)
        return INTERRUPTED
    return report_unexpected(err)


# "pid:start time" of the flow process that runs a stage (through dvc), so the stage can tell
# when that process is gone.
FLOW_PROCESS_ENV = "CIFAR10_PIPELINE_FLOW_PROCESS"


def process_start_time(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), which tells it
    apart from a later process given the same PID; None when there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[1].split()[19]


def this_process() -> str:
    return f"{os.getpid()}:{process_start_time(os.getpid()) or ''}"


def stop_when_orphaned(interval_s: float = 2.0) -> None:
    """A stage the flow runs stops as on Ctrl-C (cleaning up, exit 130) once the flow's process is
    gone: killed with SIGKILL, it had no chance to stop the stage itself."""
    pid, _, started = os.environ.get(FLOW_PROCESS_ENV, "").partition(":")
    if not pid.isdigit() or not started:
        return

    def watch() -> None:
        while process_start_time(int(pid)) == started:
            time.sleep(interval_s)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=watch, name="stop-when-orphaned", daemon=True).start()


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(), mapping every error to one stderr line and its exit code."""
    signal.signal(signal.SIGINT, signal.default_int_handler)
    interrupt_on_sigterm()
    stop_when_orphaned()
    try:
        main()
    except (Exception, KeyboardInterrupt) as err:  # noqa: BLE001 - the last resort: one line, never a traceback
        sys.exit(error_exit(err, "interrupted; outputs of this stage were not written"))
