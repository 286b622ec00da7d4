"""
Scale to zero with real processes, on real loopback sockets, on both
engines: the target's C{Start} launches a small echo server
(L{tcpproxy.tests.echoservice}) and its C{Stop} kills it.
"""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys

from twisted.internet import reactor
from twisted.internet.defer import gatherResults, inlineCallbacks
from twisted.logger import formatEvent
from twisted.trial.unittest import TestCase

from tcpproxy.app import buildApp, updateApp
from tcpproxy.config import IPV4, AppConfig, PoolConfig, ScaleToZeroConfig, Target
from tcpproxy.pool import stopPool
from tcpproxy.tests.loopback import (
    captureEvents,
    connectClient,
    deadPort,
    echoBackend,
    engineFor,
    eventually,
    listenProxy,
)
from tcpproxy.tls import loadAppTLS

SERVICE = (sys.executable, "-m", "tcpproxy.tests.echoservice")


def alive(pid: int) -> bool:
    """
    Whether process C{pid} exists and is not a zombie.
    """
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


class ScaleToZeroTests(TestCase):
    """
    On the fast engine; L{ScaleToZeroTwistedTests} runs them on Twisted's.
    """

    timeout = 60

    def service(self, delay: float = 0.0, start: tuple[str, ...] | None = None) -> Target:
        """
        A target on a free port whose C{Start} launches an echo server
        there (listening after C{delay} seconds) and whose C{Stop} kills
        it; the server is killed when the test ends if it still runs.
        """
        port = deadPort()
        pidfile = os.path.abspath(self.mktemp())
        self.starts = pidfile + ".starts"

        def cleanup() -> None:
            if os.path.exists(pidfile):
                subprocess.run([*SERVICE, "stop", pidfile], capture_output=True, check=False)

        self.addCleanup(cleanup)
        self.pidfile = pidfile
        if start is None:
            start = (*SERVICE, "start", "{port}", pidfile, str(delay))
        return Target("127.0.0.1", port, IPV4, start=start, stop=(*SERVICE, "stop", pidfile))

    def proxy(
        self,
        targets: tuple[Target, ...],
        idleAfter: float,
        startTimeout: float = 20.0,
        queueTimeout: float = 0.0,
    ) -> tuple:
        app = AppConfig(
            "web",
            (1,),
            targets,
            5.0,
            scaleToZero=ScaleToZeroConfig(idleAfter, startTimeout, 0),
            queueTimeout=queueTimeout,
        )
        factory = buildApp(app, loadAppTLS(app, "<config>"), engineFor(self), reactor)
        self.addCleanup(lambda: factory.scaler and factory.scaler.shutdown())
        port = listenProxy(self, factory)
        self.addCleanup(factory.whenIdle)
        return factory, port

    def logged(self, events: list[dict]) -> str:
        return "\n".join(formatEvent(event) for event in events)

    @inlineCallbacks
    def echo(self, port: int, payload: bytes):
        client = yield connectClient(port)
        client.transport.write(payload)
        client.transport.loseWriteConnection()
        received = yield client.readDone
        return received

    def stopped(self, factory, target: Target):
        def check() -> bool:
            """the target is stopped"""
            return factory.health.stateOf(target) == "stopped"

        return eventually(check)

    @inlineCallbacks
    def test_stoppedWhenIdleThenWokenByteExact(self):
        """
        A target running at start-up with no connection for C{IdleAfter} is
        stopped (its process is gone); the first client after that wakes
        it, gets its echo byte-exact, and the wake time is logged.
        """
        events = captureEvents(self, "tcpproxy")
        target = self.service()
        subprocess.run([*SERVICE, "start", str(target.port), self.pidfile], check=True, capture_output=True)
        with open(self.pidfile) as f:
            pid = int(f.read())

        def listening() -> bool:
            """the echo server listens"""
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", target.port)) == 0

        yield eventually(listening)
        factory, port = self.proxy((target,), idleAfter=0.3)
        payload = os.urandom(300_000)
        self.assertEqual((yield self.echo(port, payload)), payload)
        self.assertEqual(factory.health.stateOf(target), "up")
        yield self.stopped(factory, target)

        def gone() -> bool:
            """the echo server's process is gone"""
            return not alive(pid)

        yield eventually(gone)
        self.assertIn(f"app web: target {target} is stopped: no connection for 0.3s", self.logged(events))

        self.assertEqual((yield self.echo(port, payload)), payload)
        text = self.logged(events)
        self.assertRegex(text, rf"app web: target {target} is up: woken in \d+\.\d{{3}}s")
        self.assertEqual(factory.health.stateOf(target), "up")

    @inlineCallbacks
    def test_manyClientsOneStart(self):
        """
        20 clients arriving together at a stopped target cause one C{Start},
        and each gets its own bytes back.
        """
        events = captureEvents(self, "tcpproxy")
        target = self.service(delay=0.5)
        factory, port = self.proxy((target,), idleAfter=0.1)
        yield self.stopped(factory, target)
        payloads = [os.urandom(1000) + bytes([n]) for n in range(20)]
        received = yield gatherResults([self.echo(port, payload) for payload in payloads])
        self.assertEqual(received, payloads)
        self.assertEqual(self.logged(events).count(f"target {target} is stopped: starting it"), 1)

    @inlineCallbacks
    def test_refusedAfterStartTimeout(self):
        """
        A C{Start} that hangs is killed after C{StartTimeout}, and the
        client is refused, the log naming the target and why.
        """
        events = captureEvents(self, "tcpproxy")
        target = self.service(start=("sleep", "30"))
        factory, port = self.proxy((target,), idleAfter=0.1, startTimeout=0.5)
        yield self.stopped(factory, target)
        self.assertEqual((yield self.echo(port, b"hello")), b"")
        text = self.logged(events)
        self.assertIn(f"app web: target {target} did not start: no answer within 0.5s", text)

        def killed() -> bool:
            """the hung Start is killed"""
            return f"app web: target {target}: Start: still running after 0.5s: killed" in self.logged(events)

        yield eventually(killed)
        self.assertEqual(factory.health.stateOf(target), "stopped")

    @inlineCallbacks
    def test_failingStartNextTried(self):
        """
        A C{Start} that fails is logged with its exit status and last line
        of output; the next stopped target is woken for the client.
        """
        events = captureEvents(self, "tcpproxy")
        broken = self.service(start=(*SERVICE, "fail"))
        working = self.service()
        factory, port = self.proxy((broken, working), idleAfter=0.1)
        yield self.stopped(factory, broken)
        yield self.stopped(factory, working)
        self.assertEqual((yield self.echo(port, b"hello")), b"hello")
        text = self.logged(events)
        self.assertIn(
            f"app web: target {broken} did not start: its Start failed: exit status 3"
            " (last output: 'Job for app.service failed: unit not found')",
            text,
        )
        self.assertEqual(factory.health.stateOf(working), "up")
        self.assertEqual(factory.health.stateOf(broken), "stopped")

    @inlineCallbacks
    def test_failingStartRefused(self):
        """
        With no other target, a failing C{Start} refuses the client, and
        the access log names the target and why.
        """
        events = captureEvents(self, "tcpproxy")
        broken = self.service(start=(*SERVICE, "fail"))
        factory, port = self.proxy((broken,), idleAfter=0.1)
        yield self.stopped(factory, broken)
        self.assertEqual((yield self.echo(port, b"hello")), b"")
        access = self.logged([e for e in events if e["log_namespace"] == "tcpproxy.access"])
        self.assertIn(f"{broken}: its Start failed: exit status 3", access)

    @inlineCallbacks
    def test_wokenWhenRunningTargetsAreFull(self):
        """
        A client that finds every running target at its C{MaxConnections}
        wakes a stopped target, rather than being refused.
        """
        events = captureEvents(self, "tcpproxy")
        running = Target("127.0.0.1", echoBackend(self), IPV4, maxConnections=1)
        stopped = self.service()
        factory, port = self.proxy((running, stopped), idleAfter=0.1)
        yield self.stopped(factory, stopped)
        held = yield connectClient(port)
        held.transport.write(b"held")

        def echoed() -> bool:
            """the held client got its echo"""
            return bytes(held.data) == b"held"

        yield eventually(echoed)
        self.assertEqual((yield self.echo(port, b"second")), b"second")
        self.assertIn(f"app web: target {stopped} is up: woken in", self.logged(events))
        held.transport.loseConnection()
        yield held.lost

    @inlineCallbacks
    def test_wokenTargetKeepsItsMaxConnections(self):
        """
        Of two clients held for one wake-up, only one goes to the woken
        target, whose C{MaxConnections} is 1; the other waits in the
        queue, and gets its echo once the first has left.
        """
        target = dataclasses.replace(self.service(delay=0.2), maxConnections=1)
        factory, port = self.proxy((target,), idleAfter=0.1, queueTimeout=20.0)
        yield self.stopped(factory, target)
        first, second = yield gatherResults([connectClient(port), connectClient(port)])
        first.transport.write(b"first")
        second.transport.write(b"second")

        def firstEchoedSecondQueued() -> bool:
            """the first client got its echo, and the second waits in the queue"""
            return bytes(first.data) == b"first" and len(factory.dispatcher.queue) == 1

        yield eventually(firstEchoedSecondQueued)
        self.assertEqual(bytes(second.data), b"")
        self.assertEqual(factory.balancer.load.active(target), 1)
        first.transport.loseConnection()
        yield first.lost

        def secondEchoed() -> bool:
            """the second client got its echo"""
            return bytes(second.data) == b"second"

        yield eventually(secondEchoed)
        second.transport.loseConnection()
        yield second.lost

    @inlineCallbacks
    def test_beyondTheLimitWakesTheNext(self):
        """
        Two clients arriving together at two stopped targets whose
        C{MaxConnections} is 1 wake both, one client each.
        """
        events = captureEvents(self, "tcpproxy")
        one = dataclasses.replace(self.service(delay=0.2), maxConnections=1)
        two = dataclasses.replace(self.service(delay=0.2), maxConnections=1)
        factory, port = self.proxy((one, two), idleAfter=0.1)
        yield self.stopped(factory, one)
        yield self.stopped(factory, two)
        clients = yield gatherResults([connectClient(port), connectClient(port)])
        for n, client in enumerate(clients):
            client.transport.write(b"client %d" % n)

        def echoed() -> bool:
            """both clients got their echo"""
            return [bytes(c.data) for c in clients] == [b"client 0", b"client 1"]

        yield eventually(echoed)
        load = factory.balancer.load
        self.assertEqual((load.active(one), load.active(two)), (1, 1))
        for client in clients:
            client.transport.loseConnection()
            yield client.lost
        text = self.logged(events)
        self.assertIn(f"app web: target {one} is up: woken in", text)
        self.assertIn(f"app web: target {two} is up: woken in", text)

    @inlineCallbacks
    def test_reloadDroppingScaleToZeroServesTheQueue(self):
        """
        A reload that takes C{ScaleToZero} away counts the stopped targets
        as running again, at once for the clients waiting in the queue.
        """
        busy = Target("127.0.0.1", echoBackend(self), IPV4, maxConnections=1)
        other = self.service(start=(*SERVICE, "fail"))
        factory, port = self.proxy((busy, other), idleAfter=0.1, queueTimeout=20.0)
        yield self.stopped(factory, other)
        held = yield connectClient(port)
        held.transport.write(b"held")

        def heldEchoed() -> bool:
            """the held client got its echo"""
            return bytes(held.data) == b"held"

        yield eventually(heldEchoed)
        waiting = yield connectClient(port)
        waiting.transport.write(b"waiting")

        def queued() -> bool:
            """a client waits in the queue, the wake-up having failed"""
            return len(factory.dispatcher.queue) == 1

        yield eventually(queued)
        # Its service is started by hand, and the proxy told to scale no more.
        subprocess.run([*SERVICE, "start", str(other.port), self.pidfile], check=True, capture_output=True)

        def listening() -> bool:
            """the echo server listens"""
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", other.port)) == 0

        yield eventually(listening)
        self.assertEqual(bytes(waiting.data), b"")
        app = dataclasses.replace(factory.app, scaleToZero=None)
        updateApp(factory, app, loadAppTLS(app, "<config>"), engineFor(self))
        self.assertIsNone(factory.scaler)

        def served() -> bool:
            """the waiting client got its echo, the first one still held"""
            return bytes(waiting.data) == b"waiting"

        yield eventually(served)
        for client in (held, waiting):
            client.transport.loseConnection()
            yield client.lost

    @inlineCallbacks
    def test_reloadDroppingScaleToZeroDuringAWake(self):
        """
        A reload that takes C{ScaleToZero} away while a client is held for
        a target being woken does not refuse that client: the wake-up runs
        to its end (the C{Start} has run), and the client is relayed to the
        target once it is up.
        """
        events = captureEvents(self, "tcpproxy")
        target = self.service(delay=2.0)
        factory, port = self.proxy((target,), idleAfter=0.1)
        yield self.stopped(factory, target)
        scaler = factory.scaler
        self.addCleanup(scaler.shutdown)
        held = yield connectClient(port)
        held.transport.write(b"held through a reload")
        held.transport.loseWriteConnection()

        def waking() -> bool:
            """the target is being woken for the client"""
            return target in scaler._waking

        yield eventually(waking)
        app = dataclasses.replace(factory.app, scaleToZero=None)
        updateApp(factory, app, loadAppTLS(app, "<config>"), engineFor(self))
        self.assertIsNone(factory.scaler)
        self.assertEqual((yield held.readDone), b"held through a reload")
        text = self.logged(events)
        self.assertNotIn("did not start", text)
        self.assertRegex(text, rf"app web: target {target} is up: woken in \d+\.\d{{3}}s")
        # No longer scaling to zero: the woken target is not stopped again.
        self.assertEqual(scaler._timers, {})

    @inlineCallbacks
    def test_poolKeepsNoTargetAwake(self):
        """
        A warm pool's idle connections do not keep a target awake: it is
        stopped after C{IdleAfter} with its pool full, and woken for the
        next client.
        """
        target = self.service()
        subprocess.run([*SERVICE, "start", str(target.port), self.pidfile], check=True, capture_output=True)

        def listening() -> bool:
            """the echo server listens"""
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", target.port)) == 0

        yield eventually(listening)
        app = AppConfig(
            "web", (1,), (target,), 5.0, pool=PoolConfig(2, 30.0), scaleToZero=ScaleToZeroConfig(1.0, 20.0, 0)
        )
        factory = buildApp(app, loadAppTLS(app, "<config>"), engineFor(self), reactor)
        self.addCleanup(lambda: factory.scaler.shutdown())
        self.addCleanup(stopPool, factory.dialer)
        port = listenProxy(self, factory)
        self.addCleanup(factory.whenIdle)

        def pooled() -> bool:
            """the pool holds 2 idle connections"""
            return factory.dialer.idleCount() == 2

        yield eventually(pooled)
        yield self.stopped(factory, target)
        self.assertEqual((yield self.echo(port, b"awake")), b"awake")


class ScaleToZeroTwistedTests(ScaleToZeroTests):
    engine = "twisted"
