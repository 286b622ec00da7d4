"""
The live progress line of a load run: elapsed time, rate, errors.

On a terminal the line is redrawn in place each second; elsewhere (a pipe,
a CI log) each second gets a line of its own.
"""

from __future__ import annotations

from typing import TextIO

from tcpproxy.tester.stats import Sample


class ProgressLine:
    """
    Shows each second's L{Sample} of a run on C{stream}.

    @param label: put before every line, to tell the steps of a sweep apart.
    """

    def __init__(self, stream: TextIO, interactive: bool | None = None, label: str = "") -> None:
        self._stream = stream
        if interactive is None:
            interactive = bool(getattr(stream, "isatty", lambda: False)())
        self._interactive = interactive
        self._label = label
        self._errors = 0
        self._dropped = 0
        self._width = 0

    def __call__(self, sample: Sample) -> None:
        self._errors += sample.total.errors
        self._dropped += sample.total.dropped
        p99 = sample.total.latency["p99"]
        text = (
            f"{self._label}{sample.t:7.1f}s  {sample.total.reqPerSec:10.1f} req/s  "
            f"{self._errors} errors  {self._dropped} dropped  {sample.connections} conns  "
            f"p99 {'-' if p99 is None else f'{p99:.0f}'} us"
        )
        if self._interactive:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        else:
            self._stream.write(text + "\n")
        self._stream.flush()

    def finish(self) -> None:
        """
        End the line, so that what follows starts on a line of its own.
        """
        if self._interactive and self._width:
            self._stream.write("\n")
            self._stream.flush()
        self._width = 0
