"""The one exception type for problems the user can fix (bad files, bad flags, missing data).

The CLI prints it as a single line and exits with status 2; everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, reported as one line without a traceback."""


def need(module: str, extra: str, what: str):
    """A one-line error when an optional dependency is missing: which extra installs it."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise UserError(f"{what} needs {module}: pip install 'carlrar[{extra}]'")
