"""Progress messages and one-line failure reasons.

Progress goes to stderr with a fixed prefix, so stdout carries only the
markdown tables and a parent process can tell a worker's progress from
library noise.
"""

import sys

PREFIX = "[bench] "
MAX_REASON = 160


def log(message):
    print(PREFIX + message, file=sys.stderr, flush=True)


def short_reason(error):
    """`Type: first line of the message`, cut to fit a table cell's note."""
    if isinstance(error, BaseException):
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        text = f"{type(error).__name__}: {lines[0] if lines else ''}".rstrip(": ")
    else:
        text = " ".join(str(error).split())
    return text if len(text) <= MAX_REASON else text[: MAX_REASON - 3] + "..."
