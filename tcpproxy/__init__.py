"""
tcpproxy: a layer-4 (TCP) proxy and load balancer on Twisted, run by twistd.
"""

__version__ = "0.1.0"
