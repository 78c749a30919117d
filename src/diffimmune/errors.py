"""The one exception type users see: a one-line message that names the thing at fault and the fix."""


class DiffImmuneError(Exception):
    """An error the user can fix. The CLI prints its message on one line and exits with code 2."""
