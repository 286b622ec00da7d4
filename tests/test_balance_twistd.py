"""
System tests of balancing: the real C{twistd tcpproxy --demo-backends},
clients on real sockets, checked by what they get back and by the access
log: weights honoured and changed by a reload (C{SIGHUP}), a client queued
for a target at its C{MaxConnections} served when a slot frees.
"""

from __future__ import annotations

import os
import signal
import socket

from twisted.trial.unittest import TestCase

from tests.support import Twistd, connect, echoThrough, freePorts, receiveAll, waitUntil
from tests.test_twistd import linesWith


class BalanceTwistdTests(TestCase):
    def setUp(self) -> None:
        self.twistd = Twistd(self)
        self.port, self.first, self.second = freePorts(3)

    def start(self, document: dict) -> str:
        self.config = self.twistd.writeConfig(document)
        self.twistd.start("-n", "--pidfile=", "tcpproxy", "--config", self.config, "--demo-backends")
        self.twistd.waitUntilServing(self.port)
        return self.config

    def app(self, targets: list, **settings) -> dict:
        return {
            "BindAddress": "127.0.0.1",
            "Apps": [{"Name": "web", "Ports": [self.port], "Targets": targets, **settings}],
        }

    def doneLines(self) -> list[str]:
        return linesWith(self.twistd.stdout(), "[tcpproxy.access#info]", ": done after")

    def test_weightsAndReload(self) -> None:
        """
        Weights 3:1 send 6 of 8 clients to the first target; after the file
        is edited to 1:3 and C{SIGHUP} sent, 2 of the next 8.
        """
        first, second = f"127.0.0.1:{self.first}", f"127.0.0.1:{self.second}"
        self.start(self.app([{"Address": first, "Weight": 3}, second]))
        # The port accepts once bound, before the start-up lines are written.
        waitUntil(
            lambda: linesWith(self.twistd.stdout(), f"relaying to {first} (weight 3), {second}"),
            "the start-up line with the weights",
        )

        def served(count: int) -> tuple[int, int]:
            """
            Who served the last C{count} clients, from their access lines.
            """
            wanted = len(self.done) + count
            waitUntil(lambda: len(self.doneLines()) == wanted, f"{wanted} access lines")
            lines, self.done = self.doneLines()[len(self.done) :], self.doneLines()
            return tuple(len([line for line in lines if f"-> {t}: done" in line]) for t in (first, second))

        # The probe that saw the port answer was a client too.
        waitUntil(lambda: "[tcpproxy.access#" in self.twistd.stdout(), "the probe's access line")
        self.done = self.doneLines()
        for n in range(8):
            self.assertEqual(echoThrough(self.port, b"ping %d" % n)[0], b"ping %d" % n)
        self.assertEqual(served(8), (6, 2))
        self.twistd.writeConfig(self.app([first, {"Address": second, "Weight": 3}]))
        os.kill(self.twistd.process.pid, signal.SIGHUP)
        waitUntil(lambda: linesWith(self.twistd.stdout(), "reload", "Targets"), "the reload's summary")
        for _ in range(8):
            echoThrough(self.port, b"pong")
        self.assertEqual(served(8), (2, 6))

    def test_queue(self) -> None:
        """
        With its one target at C{MaxConnections} 1, a second client waits
        (logged), and is echoed what it sent when the first leaves.
        """
        self.start(
            self.app(
                [{"Address": f"127.0.0.1:{self.first}", "MaxConnections": 1}],
                QueueTimeout=30,
                Balance="least-connections",
            )
        )
        # The port accepts once bound, before the start-up lines are written.
        startup = f"to 127.0.0.1:{self.first} (at most 1), least-connections"
        waitUntil(
            lambda: linesWith(self.twistd.stdout(), startup), "the start-up line with the limit and policy"
        )
        held = connect(self.port)
        held.sendall(b"first")
        self.assertEqual(held.recv(100), b"first")
        with connect(self.port) as waiting:
            waiting.sendall(b"second, queued")
            waitUntil(
                lambda: linesWith(self.twistd.stdout(), "a client waits, 1 in the queue"), "the queue's line"
            )
            held.close()
            waiting.shutdown(socket.SHUT_WR)
            self.assertEqual(receiveAll(waiting), b"second, queued")
