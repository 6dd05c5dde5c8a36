"""Console lines that every rank may print at once."""

from __future__ import annotations

import sys
from typing import TextIO


def say(line: str, stream: TextIO | None = None) -> None:
    """Write ``line`` and its newline in one write, then flush. torchrun runs ranks unbuffered, where ``print`` writes
    the text and the newline apart, so two ranks sharing a log could splice their lines mid-line; one write of a line
    shorter than a pipe's buffer reaches it whole."""
    stream = stream or sys.stdout
    stream.write(line + "\n")
    stream.flush()
