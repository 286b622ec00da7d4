"""
The connection record: one log event when a client is refused, one when a
relayed connection ends, and, with C{"AccessLogInterval"}, interim ones
while it is open, under the C{tcpproxy.access} namespace.

Every event has the same fields whatever the format (L{FIELDS}, except
C{time}, plus C{failed} and, for a refusal, C{refusals}), for machines, as
C{--json-log} and C{twistd --logger tcpproxy.jsonlog.observer} write them
(L{tcpproxy.jsonlog}).  Its text, for the log file, is what the app's
C{"AccessLogFormat"} says (L{formatFor}):

  - C{"text"} (the default): a line for people, starting with the
    connection's id in brackets (L{tcpproxy.connid});
  - C{"json"}: one JSON object with every field of L{FIELDS};
  - a template: C{str.format} placeholders naming fields of L{FIELDS}, such
    as C{"{connectionId} {client} {bytesIn}/{bytesOut} {end}"}; a field
    with no value is C{-} (as HAProxy and nginx write it).

The text format is written lazily (Twisted formats it only for an observer
that wants text); JSON and templates are written when the record is.
"""

from __future__ import annotations

import difflib
import json
import string
from collections.abc import Callable, Iterable, Mapping
from datetime import datetime, timezone
from functools import lru_cache

from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger
from zope.interface import Attribute, Interface, implementer

log = Logger(namespace="tcpproxy.access")

END_DONE = "done"
END_CLIENT_LOST = "client reset"
END_TARGET_LOST = "target reset"
END_CLIENT_LEFT = "client left while dialling"
END_NO_TARGET = "no target"
END_ABORTED = "aborted"
END_IDLE = "idle timeout"
END_OPEN = "open"
"""
The C{end} of an interim record: the connection is still open.
"""
END_REFUSED = "refused"
"""
The C{end} of a refused client's record; C{reason} says why.
"""

FORMAT_TEXT = "text"
FORMAT_JSON = "json"

FIELDS = (
    "time",
    "connectionId",
    "client",
    "app",
    "port",
    "target",
    "failures",
    "bytesIn",
    "bytesOut",
    "duration",
    "end",
    "reason",
    "tlsVersion",
    "cipher",
    "sni",
    "alpn",
)
"""
The fields of a record, in the order C{"json"} writes them:

  - C{time}: when the record was written, ISO 8601 in UTC to the
    millisecond (C{2026-11-30T05:05:39.123Z});
  - C{connectionId}: the connection's id (L{tcpproxy.connid});
  - C{client}: the client's address, C{host:port};
  - C{app}, C{port}: the app, and its port the client connected to;
  - C{target}: the target relayed to, C{host:port}, or none;
  - C{failures}: each target that failed to connect first,
    C{"host:port: why"} (a list in JSON, joined by C{"; "} in a template);
  - C{bytesIn}: bytes from the client; C{bytesOut}: bytes to it;
  - C{duration}: seconds from accept to the record;
  - C{end}: how it ended (C{done}, C{client reset}, C{target reset},
    C{client left while dialling}, C{no target}, C{aborted},
    C{idle timeout}), C{open} in an interim record, C{refused} for a
    refused client;
  - C{reason}: why a client was refused (C{denied} by C{Allow} or
    C{Deny}, C{MaxConnections}, C{MaxConnectionsPerClient}, C{draining}:
    every target drained by an operator), else none;
  - C{tlsVersion}, C{cipher}, C{sni}, C{alpn}: of TLS terminated here,
    else none.
"""

_SAMPLE = {
    "time": "2026-01-01T00:00:00.000Z",
    "connectionId": "0000000000000000-1",
    "client": "127.0.0.1:40000",
    "app": "app",
    "port": 1,
    "target": "127.0.0.1:2",
    "failures": "127.0.0.1:3: connection refused",
    "bytesIn": 0,
    "bytesOut": 0,
    "duration": 0.5,
    "end": END_DONE,
    "reason": "-",
    "tlsVersion": "TLSv1.3",
    "cipher": "TLS_AES_256_GCM_SHA384",
    "sni": "example.com",
    "alpn": "h2",
}


class IConnectionRecord(Interface):
    """
    What the access log writes of one client's connection.
    """

    connectionId = Attribute("The connection's id (L{tcpproxy.connid.newConnectionId}).")
    app = Attribute("The L{tcpproxy.config.AppConfig} the client was accepted under (its format).")
    clientAddress = Attribute("The client's address, as the log writes it.")
    clientHost = Attribute("The client's IP address, as counted by the limits.")
    port = Attribute("The proxy's port the client connected to.")
    started = Attribute("When the client connected (the app's clock).")
    target = Attribute("The L{tcpproxy.config.Target} that was connected, or C{None}.")
    failures = Attribute("C{(target, reason text)} of each target that failed to connect.")
    bytesIn = Attribute("Bytes read from the client.")
    bytesOut = Attribute("Bytes read from the target.")
    end = Attribute("How it ended (C{END_*}), or C{None} for a clean end.")
    tlsFields = Attribute("TLS version, cipher and SNI name for the log; empty without TLS.")


class IRecordFormat(Interface):
    """
    How a record is written as text (an C{"AccessLogFormat"}).
    """

    def logFormat(text: str, fields: Mapping[str, object], when: float) -> str:
        """
        The C{log_format} of the record's event.

        @param text: the record's C{"text"} line, a format over C{fields}.
        @param fields: the event's fields (every one of L{FIELDS} but
            C{time}).
        @param when: the time of the record, seconds since the epoch.
        """


def isoTime(when: float) -> str:
    """
    C{when} (seconds since the epoch) as ISO 8601 in UTC, to the
    millisecond: C{2026-11-30T05:05:39.123Z}.
    """
    return datetime.fromtimestamp(when, timezone.utc).isoformat(timespec="milliseconds")[:-6] + "Z"


def _literal(line: str) -> str:
    # A log_format that formats to exactly this line.
    return line.replace("{", "{{").replace("}", "}}")


def recordValues(fields: Mapping[str, object], when: float) -> dict[str, object]:
    """
    Every field of L{FIELDS}, in that order, C{None} for those without a
    value; the duration to the microsecond.
    """
    values = {name: fields.get(name) for name in FIELDS}
    values["time"] = isoTime(when)
    values["duration"] = round(values["duration"], 6)
    return values


@implementer(IRecordFormat)
class TextFormat:
    """
    Today's line, formatted lazily by whoever wants text.
    """

    def logFormat(self, text: str, fields: Mapping[str, object], when: float) -> str:
        return text


@implementer(IRecordFormat)
class JSONFormat:
    """
    One JSON object on one line, with every field of L{FIELDS}.
    """

    def logFormat(self, text: str, fields: Mapping[str, object], when: float) -> str:
        return _literal(json.dumps(recordValues(fields, when), separators=(", ", ": ")))


@implementer(IRecordFormat)
class TemplateFormat:
    """
    A template of C{str.format} placeholders naming fields of L{FIELDS}
    (checked by L{checkTemplate}); a field with no value is C{-}, the
    failures are joined by C{"; "}.
    """

    def __init__(self, template: str) -> None:
        self.template = template

    def logFormat(self, text: str, fields: Mapping[str, object], when: float) -> str:
        values = recordValues(fields, when)
        values["failures"] = "; ".join(values["failures"] or ()) or None
        for name, value in values.items():
            if value is None:
                values[name] = "-"
        return _literal(self.template.format_map(values))


def checkTemplate(template: str) -> None:
    """
    Check an C{"AccessLogFormat"} template before it is used: each
    placeholder names a field of L{FIELDS} (no index, attribute or nested
    placeholder), its conversion and format spec suit that field's value,
    and the record is one line.

    @raise ValueError: it would not do; the text says why, in a few words.
    """
    if "\n" in template or "\r" in template:
        raise ValueError("has a line break, and a record is one line")
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ValueError(f"is not a template: {e}; write a brace as {{{{ or }}}}") from None
    names = [name for _, name, _, _ in parts if name is not None]
    if not names:
        raise ValueError(f'is not "{FORMAT_TEXT}", "{FORMAT_JSON}" or a template with {{field}} placeholders')
    for _, name, spec, _ in parts:
        if name is None:
            continue
        if name not in FIELDS:
            close = difflib.get_close_matches(name, FIELDS, n=1, cutoff=0.6)
            hint = f" (did you mean {{{close[0]}}}?)" if close else ""
            raise ValueError(
                f"has an unknown placeholder {{{name}}}{hint}; the fields are {', '.join(FIELDS)}"
            )
        if "{" in (spec or ""):
            raise ValueError(f"has a placeholder inside {{{name}}}'s format")
    try:
        template.format_map(_SAMPLE)
    except (ValueError, TypeError) as e:
        raise ValueError(f"cannot be written: {e}") from None


@lru_cache(maxsize=64)
def formatFor(spec: str) -> IRecordFormat:
    """
    The format an C{"AccessLogFormat"} value names (checked by the
    configuration: L{checkTemplate}).
    """
    if spec == FORMAT_TEXT:
        return TextFormat()
    if spec == FORMAT_JSON:
        return JSONFormat()
    return TemplateFormat(spec)


_TEXT = TextFormat()


def logRefusal(
    app: str,
    clientAddress: str,
    port: int,
    reason: str,
    refusals: Mapping[str, int],
    connectionId: str,
    recordFormat: IRecordFormat = _TEXT,
    when: float = 0.0,
) -> None:
    """
    A client refused by the app's admission (and closed) on C{port}.

    @param refusals: how many clients the app has refused, by reason.
    @param recordFormat: the app's C{"AccessLogFormat"} (L{formatFor}).
    @param when: the time of the refusal, seconds since the epoch.
    """
    fields = {
        "connectionId": connectionId,
        "client": clientAddress,
        "app": app,
        "port": port,
        "target": None,
        "failures": [],
        "bytesIn": 0,
        "bytesOut": 0,
        "duration": 0.0,
        "end": END_REFUSED,
        "reason": reason,
        "refusals": dict(refusals),
    }
    text = "[{connectionId}] {client} -> {app}:{port}: refused ({reason})"
    log.warn(recordFormat.logFormat(text, fields, when), **fields)


def logConnection(app: str, record: IConnectionRecord, end: str, duration: float) -> None:
    """
    A connection has ended, both sides closed (or, with C{end} L{END_OPEN},
    an interim record of one still open): a warning when no target could
    serve it (the text then lists every target's reason), else info.  In
    the format of the app's settings the client was accepted under.

    @param duration: seconds from accept to the record.
    """
    failures = [f"{target}: {why}" for target, why in record.failures]
    emit = log.warn if end == END_NO_TARGET else log.info
    tlsFields = record.tlsFields
    tls = ""
    if tlsFields:
        sni = "SNI {sni}" if tlsFields.get("sni") else "no SNI"
        tls = " ({tlsVersion} {cipher}, " + sni + ")"
    what = "open for {duration:.3f}s" if end == END_OPEN else "{end} after {duration:.3f}s"
    # A client no target served (none answered, or it left while they were
    # dialled) has no "-> target" part, as a refusal has none.
    via = ": " if record.target is None else " -> {target}: "
    text = (
        "[{connectionId}] {client} -> {app}:{port}" + tls + via + what + ", "
        "{bytesIn} bytes in, {bytesOut} bytes out" + ("; failed: {failed}" if failures else "")
    )
    fields = {
        "connectionId": record.connectionId,
        "client": record.clientAddress,
        "app": app,
        "port": record.port,
        "target": None if record.target is None else str(record.target),
        "failures": failures,
        "failed": "; ".join(failures),
        "bytesIn": record.bytesIn,
        "bytesOut": record.bytesOut,
        "duration": duration,
        "end": end,
        **tlsFields,
    }
    spec = record.app.accessLogFormat
    if spec != FORMAT_TEXT:
        text = formatFor(spec).logFormat(text, fields, record.started + duration)
    emit(text, **fields)


STEPS = 4
"""
Looks per C{AccessLogInterval}: an interim record is written between 0 and
a quarter of the interval late.
"""


class InterimRecords:
    """
    Writes an interim record of each open connection of an app every
    C{AccessLogInterval} seconds (of the settings it was accepted under),
    counted from its accept, so long-lived streams show up before they end
    (as Envoy's C{access_log_flush_interval}).

    One timer for the app, as L{tcpproxy.idle.IdleSweeper}: it looks at
    every open connection L{STEPS} times per interval, and writes a record
    for those that crossed a multiple of their interval since the last
    look.  Nothing is kept or scheduled per connection (a
    L{twisted.internet.base.DelayedCall} each would cost a heap push and
    pop and about 1 KiB per connection); each look costs a subtraction
    and a division per open connection.  With nothing open, no timer is
    left behind (L{stop}, and L{start} again on the next client).

    @param watched: returns the app's open connections now.
    @param write: writes C{record}'s interim record at C{now}.
    """

    def __init__(
        self,
        clock: IReactorTime,
        watched: Callable[[], Iterable[IConnectionRecord]],
        write: Callable[[IConnectionRecord, float], None],
    ) -> None:
        self._clock = clock
        self._watched = watched
        self._write = write
        self._call: IDelayedCall | None = None
        self._period = 0.0
        self._last = 0.0

    def start(self, interval: float) -> None:
        """
        A connection with this interval is open: look every
        C{interval / STEPS} seconds at most.
        """
        period = interval / STEPS
        if self._call is not None:
            if period >= self._period:
                return
            self._call.cancel()
        else:
            self._last = self._clock.seconds()
        self._period = period
        self._call = self._clock.callLater(period, self._look)

    def _look(self) -> None:
        self._call = None
        now = self._clock.seconds()
        last, self._last = self._last, now
        shortest = None
        for record in list(self._watched()):
            interval = record.app.accessLogInterval
            if not interval:
                continue
            shortest = interval if shortest is None else min(shortest, interval)
            age = now - record.started
            if age >= interval and age // interval > (last - record.started) // interval:
                self._write(record, now)
        if shortest is not None:
            self.start(shortest)

    def stop(self) -> None:
        """
        Cancel the timer (no connection is open).
        """
        if self._call is not None:
            self._call.cancel()
            self._call = None
