"""One exception type for mistakes a user can fix.

The command-line entry points catch `UserError`, print its message on one line and exit with
code 2. Everything else is a bug in minilm and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: the message says what is wrong and how to fix it, in one line."""
