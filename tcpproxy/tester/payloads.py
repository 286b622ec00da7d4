"""
What the load sends: one text, the lines of a file in turn, or random bytes.

A L{Payloads} is shared by a run; each connection takes its own
L{Payloads.cursor}, so every connection sends the messages in the same
order, starting from the first.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator, Sequence

RANDOM_POOL = 8
"""
How many distinct random messages C{--size} makes up front; connections send
them in turn, so that a reply can not match by accident the message before.
"""

RANDOM_POOL_BYTES = 64 * 1024 * 1024
"""
The most memory the random pool may take: with huge messages, fewer differ.
"""


class PayloadError(Exception):
    """
    The messages cannot be made (unreadable or empty file, empty text).
    """


class Payloads:
    """
    A fixed sequence of messages, sent in turn and then again.

    @ivar messages: the distinct messages, in sending order.
    @ivar description: a few words for the report.
    """

    def __init__(self, messages: Sequence[bytes], description: str) -> None:
        if not messages or not all(messages):
            raise PayloadError("there is no message to send (an empty message cannot be echoed)")
        self.messages = tuple(messages)
        self.description = description

    def cursor(self) -> Callable[[], bytes]:
        """
        A function that returns the next message each time it is called.
        """
        cycle: Iterator[bytes] = itertools.cycle(self.messages)
        return cycle.__next__


def fromText(text: str) -> Payloads:
    """
    The same message every time: C{text} encoded as UTF-8.
    """
    data = text.encode("utf-8")
    if not data:
        raise PayloadError("--message is empty; give it some text")
    return Payloads([data], f"{len(data)}-byte text")


def fromFile(path: str) -> Payloads:
    """
    One message per line of the file at C{path}, newline included.
    """
    try:
        with open(path, "rb") as f:
            lines = f.read().splitlines(keepends=True)
    except OSError as e:
        raise PayloadError(f"--message-file {path}: cannot read it: {e.strerror or e}") from None
    lines = [line for line in lines if line.strip(b"\r\n")]
    if not lines:
        raise PayloadError(f"--message-file {path}: has no line to send")
    return Payloads(lines, f"{len(lines)} line(s) of {os.path.basename(path)}")


def fromSize(size: int, randomBytes: Callable[[int], bytes] = os.urandom) -> Payloads:
    """
    Messages of C{size} random bytes.
    """
    if size < 1:
        raise PayloadError("--size must be at least 1 byte")
    count = max(1, min(RANDOM_POOL, RANDOM_POOL_BYTES // size))
    return Payloads([randomBytes(size) for _ in range(count)], f"{size} random bytes")
