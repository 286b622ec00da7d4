"""
Connection ids: one per client connection, written in every record and log
line about it, so the lines of one connection can be found together (the
refusal, the TLS failure, the access-log record and its interim records).

An id is unique for the life of the process, across the worker processes
of a host and across restarts, and costs no system call to make: it is a
tag made once per process (again in a forked child) followed by a counter,
C{"<tag>-<counter>"}, such as C{"0JRB6K4Q3M5ZT1X8-1f"}:

  - the tag is 80 bits in Crockford's base 32 (16 characters, no C{I},
    C{L}, C{O} or C{U}: they read as digits), the digits of the most
    significant bits first:
      - 42 bits: the time the tag was made, in milliseconds since the
        Unix epoch (up to the year 2109);
      - 22 bits: the process id (Linux's C{pid_max} is at most 2**22);
      - 16 bits: random (C{os.urandom}, once per process).
    Two processes alive at once have different process ids, and a process
    started later has a later time (the same process id is not given out
    again within the millisecond), so no two processes of a host share a
    tag; the random bits cover a clock set back, and hosts sharing a log.
    Tags sort by the time their process started.
  - the counter is the connection's number in the process, in hexadecimal,
    from 1: a C{next} on an L{itertools.count}, no lock needed (the
    reactor's thread makes every id).

This is the shape of a ULID (a time, then what makes it unique within the
millisecond), with the counter doing the randomness's work within the
process, as a ULID's monotonic mode does.
"""

from __future__ import annotations

import itertools
import os
import time

ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
"""
Crockford's base 32 (U{https://www.crockford.com/base32.html}).
"""

TAG_LENGTH = 16

PATTERN = "^[0-9A-HJKMNP-TV-Z]{16}-[1-9a-f][0-9a-f]*$"
"""
A regular expression that matches a connection id, whole.
"""


def _base32(value: int, length: int) -> str:
    digits = []
    for _ in range(length):
        value, digit = divmod(value, 32)
        digits.append(ALPHABET[digit])
    return "".join(reversed(digits))


def processTag(now: float | None = None, pid: int | None = None, random: bytes | None = None) -> str:
    """
    The tag of this process's ids (see the module's docstring).

    @param now: seconds since the epoch; the time now if C{None}.
    @param pid: the process id; this process's if C{None}.
    @param random: 2 bytes; 2 from C{os.urandom} if C{None}.
    """
    if now is None:
        now = time.time()
    if pid is None:
        pid = os.getpid()
    if random is None:
        random = os.urandom(2)
    millis = int(now * 1000) & ((1 << 42) - 1)
    value = (millis << 38) | ((pid & ((1 << 22) - 1)) << 16) | int.from_bytes(random[:2], "big")
    return _base32(value, TAG_LENGTH)


class ConnectionIds:
    """
    Makes the ids of one process: L{next} is what the relay calls for each
    connection.

    @ivar tag: the process's tag.
    """

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self._prefix = tag + "-"
        self._counter = itertools.count(1)

    def nextNumber(self) -> int:
        """
        The number of a new connection, from 1: its id is L{format}C{(number)}.
        """
        return next(self._counter)

    def format(self, number: int) -> str:
        """
        The id of the connection numbered C{number}: the tag, C{-}, and the
        number in hexadecimal.
        """
        return f"{self._prefix}{number:x}"

    def next(self) -> str:
        """
        A new id.
        """
        return self.format(next(self._counter))


_ids = ConnectionIds(processTag())


def _forked() -> None:
    # A child of fork (twistd daemonising, worker processes) gets a tag of
    # its own: its parent's counter would give the same ids twice.
    global _ids
    _ids = ConnectionIds(processTag())


os.register_at_fork(after_in_child=_forked)


def newConnectionId() -> str:
    """
    A new connection id, unique across this host's processes and restarts.
    """
    return _ids.next()


def newConnectionNumber() -> int:
    """
    A new connection's number, for an id written only when it is asked for
    (L{connectionIdOf}): what an open connection keeps is then an int of 32
    bytes, not a string of 72, and a connection that is never logged never
    has its id written at all.
    """
    return _ids.nextNumber()


def connectionIdOf(number: int) -> str:
    """
    The id of the connection numbered C{number} by L{newConnectionNumber}
    in this process.  (A child of fork writes its own tag: a number it
    inherited is not one of its connections.)
    """
    return _ids.format(number)
