"""
The connection record: one log event when a client is refused, and one
when a relayed connection ends, under the C{tcpproxy.access} namespace.

Every line starts with the connection's id in brackets (L{tcpproxy.connid}),
which is also its C{connectionId} field.

The text is for people; the fields (C{connectionId}, C{client}, C{app}, C{port}, C{target},
C{failures}, C{bytesIn}, C{bytesOut}, C{duration}, C{end}, and for TLS
terminated here C{tlsVersion}, C{cipher}, C{sni}) are for machines, as
C{twistd --logger tcpproxy.jsonlog.observer} writes them.
"""

from __future__ import annotations

from collections.abc import Mapping

from twisted.logger import Logger
from zope.interface import Attribute, Interface

log = Logger(namespace="tcpproxy.access")

END_DONE = "done"
END_CLIENT_LOST = "client reset"
END_TARGET_LOST = "target reset"
END_CLIENT_LEFT = "client left while dialling"
END_NO_TARGET = "no target"
END_ABORTED = "aborted"
END_IDLE = "idle timeout"


class IConnectionRecord(Interface):
    """
    What the access log writes of one client's connection.
    """

    connectionId = Attribute("The connection's id (L{tcpproxy.connid.newConnectionId}).")
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


def logRefusal(
    app: str, clientAddress: str, port: int, reason: str, refusals: Mapping[str, int], connectionId: str
) -> None:
    """
    A client refused by the app's admission (and closed) on C{port}.

    @param refusals: how many clients the app has refused, by reason.
    """
    log.warn(
        "[{connectionId}] {client} -> {app}:{port}: refused ({reason})",
        connectionId=connectionId,
        client=clientAddress,
        app=app,
        port=port,
        reason=reason,
        refusals=dict(refusals),
    )


def logConnection(app: str, record: IConnectionRecord, end: str, duration: float) -> None:
    """
    A connection has ended, both sides closed: a warning when no target
    could serve it (the text then lists every target's reason), else info.

    @param duration: seconds from accept to the end.
    """
    failures = [f"{target}: {why}" for target, why in record.failures]
    emit = log.warn if end == END_NO_TARGET else log.info
    tlsFields = record.tlsFields
    tls = ""
    if tlsFields:
        sni = "SNI {sni}" if tlsFields.get("sni") else "no SNI"
        tls = " ({tlsVersion} {cipher}, " + sni + ")"
    emit(
        "[{connectionId}] {client} -> {app}:{port}" + tls + " -> {target}: {end} after {duration:.3f}s, "
        "{bytesIn} bytes in, {bytesOut} bytes out" + ("; failed: {failed}" if failures else ""),
        connectionId=record.connectionId,
        client=record.clientAddress,
        app=app,
        port=record.port,
        target=None if record.target is None else str(record.target),
        failures=failures,
        failed="; ".join(failures),
        bytesIn=record.bytesIn,
        bytesOut=record.bytesOut,
        duration=duration,
        end=end,
        **tlsFields,
    )
