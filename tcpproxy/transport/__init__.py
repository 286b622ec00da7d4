"""
The fast engine: Twisted's transport interfaces on bare sockets (L{tcp}),
an epoll set of the project's own (L{poller}), and the engines that choose
between these and Twisted's own transports (L{engine}).
"""
