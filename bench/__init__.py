"""
A benchmark suite for tcpproxy, run as C{python -m bench} from the repository root.

It starts its own loopback backends, then measures in the same run, scenario
by scenario and repetition by repetition: no proxy at all (I{direct}, the
ceiling), the real C{twistd -n tcpproxy} process, HAProxy in C{mode tcp}
(when installed) and Twisted's own C{portforward}.  Absolute figures drift on
a shared machine, so every figure is also given as a ratio against direct and
against HAProxy measured moments apart.  See C{bench/README.rst}.

Only the standard library (and Twisted's C{twistd}, to run the proxies) is
used: the load generator and the backends are plain non-blocking sockets on
C{epoll}, so that they are not the bottleneck.
"""
