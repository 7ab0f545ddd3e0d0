"""One exception type per cause, each with the exit code a stage ends with.

Stages raise these with a message that names the file/key/value and the fix; `run_main` turns
them into one line on stderr and the exit code, so a user (or a scheduler) never has to read a
traceback to learn what went wrong.
"""

from __future__ import annotations

import sys
from collections.abc import Callable


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


def run_main(main: Callable[[], None]) -> None:
    """Run a stage's main(), mapping our errors to one stderr line and their exit code."""
    try:
        main()
    except PipelineError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)
    except KeyboardInterrupt:
        print("error: interrupted; outputs of this stage were not written", file=sys.stderr)
        sys.exit(130)
