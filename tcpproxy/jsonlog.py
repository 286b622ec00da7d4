"""
JSON-lines logging for machines: every event written with all its fields
(connectionId, client, app, port, target, bytesIn, bytesOut, duration, end,
...), one JSON object per line, so the access log can be fed to a log
pipeline without parsing text.

Two ways to have it:

  - C{twistd tcpproxy --json-log PATH}: JSON lines appended to C{PATH},
    besides the usual text log (L{JSONLogService});
  - C{twistd --logger tcpproxy.jsonlog.observer tcpproxy}: JSON lines
    instead of the text log, to the file named by the C{TCPPROXY_JSON_LOG}
    environment variable or, without it, to standard output (which a daemon
    has closed: set the variable then).  C{twistd --logger} takes a
    callable with no argument, hence the variable.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.logger import ILogObserver, LogPublisher, globalLogPublisher, jsonFileLogObserver

ENVIRONMENT_VARIABLE = "TCPPROXY_JSON_LOG"


def observer() -> ILogObserver:
    """
    The observer C{twistd --logger} asks for: JSON lines to the file in
    C{$TCPPROXY_JSON_LOG}, appended to, or to standard output.
    """
    path = os.environ.get(ENVIRONMENT_VARIABLE)
    stream = open(path, "a", encoding="utf-8") if path else sys.stdout  # noqa: SIM115
    return jsonFileLogObserver(stream, recordSeparator="")


class JSONLogService(MultiService):
    """
    Writes every log event as a JSON line to a file while its child
    services run (C{--json-log}): from just before they start until they
    have all stopped, so the records of a drain at stop are written too.

    The file is opened when this is made (so a path that cannot be written
    is refused before the proxy starts) and appended to.  It is not
    reopened on C{SIGUSR1} as C{twistd}'s own C{--logfile} is: rotate it
    with C{copytruncate} (logrotate).

    @ivar path: the file's path.
    @raise OSError: the file cannot be opened for appending.
    """

    def __init__(self, path: str, publisher: LogPublisher = globalLogPublisher) -> None:
        MultiService.__init__(self)
        self.path = path
        self._publisher = publisher
        self._stream = open(path, "a", encoding="utf-8")  # noqa: SIM115
        self._observer = jsonFileLogObserver(self._stream, recordSeparator="")

    def startService(self) -> None:
        self._publisher.addObserver(self._observer)
        MultiService.startService(self)

    def stopService(self) -> Deferred:
        def stopped(result: object) -> object:
            self._publisher.removeObserver(self._observer)
            self._stream.close()
            return result

        return MultiService.stopService(self).addBoth(stopped)

    def close(self) -> None:
        """
        Close the file of a service that will not be started.
        """
        self._stream.close()
