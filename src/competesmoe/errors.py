"""The project's error types. `competesmoe <command>` turns any `CompeteSMoEError` into one line on stderr
and exit code 1; every other exception is a bug and keeps its traceback."""
from __future__ import annotations


class CompeteSMoEError(Exception):
    """Bad input or an impossible request; the message names the problem."""
