"""
A worker's log events on their way to its main process (C{--workers N}):
one JSON object per line, made cheaply, read back as an event that logs
the same text as the worker would have.

Twisted's own JSON form (L{twisted.logger.eventAsJSON}) keeps everything
needed to format the event again later, at a cost per event (each field
flattened for each placeholder, then every value encoded with a fallback
for objects): with the access log on, that was most of what a connection
cost a worker and its main process beyond the relay itself.  Here the
worker formats the text once, as it would for its own log, and sends
that with the event's plain fields (what C{--json-log} writes); the main
process publishes an event whose C{log_format} is that text.

A failure (C{log_failure}) travels as its traceback, appended to the
text.
"""

from __future__ import annotations

import json

from twisted.internet.interfaces import IReactorTime
from twisted.logger import ILogObserver, LogLevel, formatEvent
from zope.interface import implementer

_dumps = json.JSONEncoder(default=repr, separators=(",", ":")).encode


def encodeEvent(event: dict) -> bytes:
    """
    One line (newline included) for C{event}: its text, time, level,
    namespace, and every field not Twisted's own (C{log_*}); a value JSON
    has no form for is sent as its C{repr}.
    """
    text = formatEvent(event) if event.get("log_format") is not None else ""
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}" if text else failure.getTraceback()
    level = event.get("log_level")
    record = {key: value for key, value in event.items() if not key.startswith("log_")}
    record["log_text"] = text
    record["log_time"] = event.get("log_time")
    record["log_level"] = level.name if level is not None else None
    record["log_namespace"] = event.get("log_namespace")
    return _dumps(record).encode("utf-8") + b"\n"


def decodeEvent(line: bytes | str) -> dict:
    """
    The event for a line of L{encodeEvent}: its C{log_format} formats to
    the worker's text exactly.

    @raise ValueError: the line is not such a line.
    """
    record = json.loads(line)
    if not isinstance(record, dict) or "log_text" not in record:
        raise ValueError("not an event")
    text = record.pop("log_text")
    record["log_format"] = text.replace("{", "{{").replace("}", "}}")
    level = record.get("log_level")
    record["log_level"] = LogLevel.levelWithName(level) if level else LogLevel.info
    return record


@implementer(ILogObserver)
class PipeObserver:
    """
    Writes each event as a line of L{encodeEvent} to a binary stream: the
    lines of one turn of the reactor in one write, at the end of that turn
    (C{callLater(0)}), so that a burst of connections ending together
    costs the worker one system call and its main process one wake-up,
    not one per record.  L{flush} writes what is left (at exit).
    """

    def __init__(self, stream, clock: IReactorTime) -> None:
        self._stream = stream
        self._clock = clock
        self._lines: list[bytes] = []
        self._call = None

    def __call__(self, event: dict) -> None:
        self._lines.append(encodeEvent(event))
        if self._call is None:
            self._call = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        if self._call is not None and self._call.active():
            self._call.cancel()
        self._call = None
        lines, self._lines = self._lines, []
        if lines:
            try:
                self._stream.write(b"".join(lines))
                self._stream.flush()
            except OSError:
                pass  # the main process is gone: nobody to log to
