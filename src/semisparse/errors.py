"""User-facing errors: the CLI prints them as one line and exits with code 2."""


class UserError(Exception):
    """Bad input from the user (a flag, a file, a model id, a pattern). Printed without a traceback."""
