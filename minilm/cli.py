"""What the command-line scripts share: turning a UserError into one line and exit code 2."""
from __future__ import annotations

import sys
from typing import Callable

from minilm.errors import UserError


def run_cli(main: Callable[[list[str]], None]) -> None:
    try:
        main(sys.argv[1:])
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
