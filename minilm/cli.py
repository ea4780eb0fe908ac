"""What the command-line scripts share: turning a UserError into one line and exit code 2."""
from __future__ import annotations

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
    except SystemExit as stop:  # e.g. train.py's 128 + signal after a checkpointed stop
        if isinstance(stop.code, str):
            print(stop.code, file=sys.stderr)
            code = 1
        else:
            code = stop.code or 0
    exit_process(code)
