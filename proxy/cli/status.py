"""The CLI's exit statuses and its one-line errors on stderr."""

from __future__ import annotations

import sys

USAGE_ERROR = 2  # argparse's own status: the command line or a setting is wrong
FAILED = 1  # a well-formed command that could not be carried out


def fail(message: str, status: int) -> int:
    """Print `message` as the one line on stderr; return the exit status."""
    print(message, file=sys.stderr)
    return status
