"""The one exception type a user can act on; the CLI prints it as one line, never a traceback."""


class HegelionError(Exception):
    """What happened and what to do about it, in one sentence."""
