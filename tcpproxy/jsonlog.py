"""
JSON-lines logging for machines: C{twistd --logger tcpproxy.jsonlog.observer}.

Every event is written with all its fields (client, app, port, target,
bytesIn, bytesOut, duration, end, ...), one JSON object per line, so the
access log can be fed to a log pipeline without parsing text.  The file is
named by the C{TCPPROXY_JSON_LOG} environment variable; without it, events go
to standard output (which a daemon has closed: set the variable then).
"""

from __future__ import annotations

import os
import sys

from twisted.logger import ILogObserver, jsonFileLogObserver

ENVIRONMENT_VARIABLE = "TCPPROXY_JSON_LOG"


def observer() -> ILogObserver:
    """
    The observer C{twistd --logger} asks for: JSON lines to the file in
    C{$TCPPROXY_JSON_LOG}, appended to, or to standard output.
    """
    path = os.environ.get(ENVIRONMENT_VARIABLE)
    stream = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115
    return jsonFileLogObserver(stream, recordSeparator="")
