"""
The C{twistd tcpproxy} plugin.

Kept to these few lines: twistd imports every plugin module to list them, so
the real work (L{tcpproxy.tap}) is imported only when C{tcpproxy} is run.
"""

from twisted.application.service import ServiceMaker

tcpproxy = ServiceMaker(
    "tcpproxy",
    "tcpproxy.tap",
    "A layer-4 (TCP) proxy and round-robin load balancer.",
    "tcpproxy",
)
