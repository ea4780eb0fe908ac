"""What the command-line scripts share: turning a UserError into one line and exit code 2."""
from __future__ import annotations

import os
import sys
from typing import Callable

from minilm.distributed import exit_process
from minilm.errors import UserError


def run_cli(main: Callable[[list[str]], None]) -> None:
    """Run `main(argv)`; a UserError becomes `error: ...` on stderr and exit code 2. Every exit goes
    through exit_process(), which a torchrun worker needs to end cleanly (see its docstring)."""
    code = 0
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        code = 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    except BrokenPipeError:   # `sample.py ... | head`: the reader has gone; stop quietly, as a shell
        quiet_stdout()        # tool does on SIGPIPE (Python ignores SIGPIPE and raises this instead)
        code = 128 + 13
    except SystemExit as stop:  # e.g. train.py's 128 + signal after a checkpointed stop
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            code = 1
        else:
            code = stop.code or 0
    exit_process(code)


def quiet_stdout() -> None:
    """Point stdout at /dev/null: the interpreter flushes it once more at exit, and a flush into
    the closed pipe would raise BrokenPipeError again, with a traceback."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):   # no real file descriptor (stdout replaced in-process)
        pass
