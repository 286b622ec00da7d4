"""
Tests for L{tcpproxy.reload}: an old and a new configuration in, the list
of changes out.
"""

from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.config import parseConfig
from tcpproxy.reload import AppChange, PortMove, ReloadPlan, keyOf, planReload, withoutPorts


def app(name, ports, targets=("127.0.0.1:9",), **extra):
    return {"Name": name, "Ports": list(ports), "Targets": list(targets), **extra}


def config(*apps, **top):
    return parseConfig({"BindAddress": "127.0.0.1", "Apps": list(apps), **top}, "test.json")


class PlanTests(SynchronousTestCase):
    def test_same(self):
        """
        The same configuration read again changes nothing.
        """
        old = config(app("web", [1, 2]), app("api", [3]))
        plan = planReload(old, config(app("web", [1, 2]), app("api", [3])))
        self.assertFalse(plan)
        self.assertEqual(plan.describe(), [])
        self.assertEqual(plan, ReloadPlan(old, plan.new))

    def test_portOrderIsNoChange(self):
        """
        The order of an app's ports means nothing.
        """
        self.assertFalse(planReload(config(app("web", [1, 2])), config(app("web", [2, 1]))))

    def test_portsAddedAndRemoved(self):
        old = config(app("web", [1, 2]), app("api", [3]))
        new = config(app("web", [2, 4]), app("api", [3, 5]))
        plan = planReload(old, new)
        self.assertEqual(plan.addedPorts, ((4, "web"), (5, "api")))
        self.assertEqual(plan.removedPorts, ((1, "web"),))
        self.assertEqual(plan.movedPorts, ())
        self.assertEqual(
            [(c.name, c.keys) for c in plan.changedApps], [("web", ("Ports",)), ("api", ("Ports",))]
        )
        self.assertFalse(any(c.servesDifferently for c in plan.changedApps))
        self.assertEqual(
            plan.describe(),
            ["ports added: 4, 5", "ports removed: 1", 'apps changed: "web" (Ports), "api" (Ports)'],
        )

    def test_portMoved(self):
        """
        A port listed under another app is a move, not a removal and an
        addition: its socket is kept.
        """
        plan = planReload(
            config(app("web", [1, 2]), app("api", [3])), config(app("web", [1]), app("api", [3, 2]))
        )
        self.assertEqual(plan.movedPorts, (PortMove(2, "web", "api"),))
        self.assertEqual((plan.addedPorts, plan.removedPorts), ((), ()))
        self.assertIn('ports moved: 2 ("web" -> "api")', plan.describe())

    def test_appRenamed(self):
        """
        An app is known by its name: renamed, it is removed and added, and
        its ports move to the new one.
        """
        old = config(app("web", [1, 2]))
        new = config(app("www", [1, 2]))
        plan = planReload(old, new)
        self.assertEqual(plan.addedApps, new.apps)
        self.assertEqual(plan.removedApps, old.apps)
        self.assertEqual(plan.movedPorts, (PortMove(1, "web", "www"), PortMove(2, "web", "www")))
        self.assertEqual(plan.changedApps, ())

    def test_appRemovedWithItsPorts(self):
        old = config(app("web", [1]), app("api", [2, 3]))
        plan = planReload(old, config(app("web", [1])))
        self.assertEqual(plan.removedApps, old.apps[1:])
        self.assertEqual(plan.removedPorts, ((2, "api"), (3, "api")))
        self.assertEqual(plan.describe(), ["ports removed: 2, 3", 'apps removed: "api"'])

    def test_appAdded(self):
        new = config(app("web", [1]), app("api", [2]))
        plan = planReload(config(app("web", [1])), new)
        self.assertEqual(plan.addedApps, new.apps[1:])
        self.assertEqual(plan.addedPorts, ((2, "api"),))

    def test_targetsAndTimeout(self):
        """
        Changed settings are named by their configuration keys; the target
        order matters (it is the failover order).
        """
        old = config(app("web", [1], ["127.0.0.1:8", "127.0.0.1:9"]))
        plan = planReload(old, config(app("web", [1], ["127.0.0.1:9", "127.0.0.1:8"], ConnectTimeout=2)))
        [change] = plan.changedApps
        self.assertEqual(change, AppChange(old.apps[0], plan.new.apps[0], ("Targets", "ConnectTimeout")))
        self.assertTrue(change.servesDifferently)
        self.assertEqual(plan.describe(), ['apps changed: "web" (Targets, ConnectTimeout)'])

    def test_targetCommands(self):
        """
        A target's C{Start} or C{Stop} changed is a change of C{Targets},
        though the target is the same address.
        """
        target = {
            "Address": "127.0.0.1:9",
            "Start": ["systemctl", "start", "a"],
            "Stop": ["systemctl", "stop", "a"],
        }
        old = config(app("web", [1], [target], ScaleToZero={}))
        plan = planReload(
            old, config(app("web", [1], [{**target, "Stop": ["docker", "stop", "a"]}], ScaleToZero={}))
        )
        self.assertEqual(plan.describe(), ['apps changed: "web" (Targets)'])
        self.assertFalse(planReload(old, config(app("web", [1], [target], ScaleToZero={}))))

    def test_topLevel(self):
        plan = planReload(config(app("web", [1])), config(app("web", [1]), BindAddress="::1", DrainTimeout=3))
        self.assertEqual(plan.bindAddress, ("127.0.0.1", "::1"))
        self.assertEqual(plan.drainTimeout, (10.0, 3.0))
        self.assertEqual(plan.describe(), ["BindAddress: 127.0.0.1 -> ::1", "DrainTimeout: 10s -> 3s"])

    def test_everythingAtOnce(self):
        """
        The description lists each kind of change once, in a fixed order,
        so the one-line summary reads the same way every time.
        """
        old = config(app("a", [1, 2]), app("b", [3]), app("gone", [4]))
        new = config(app("a", [1, 5], ["127.0.0.1:7"]), app("b", [3, 2]), app("new", [6]), DrainTimeout=1)
        self.assertEqual(
            planReload(old, new).describe(),
            [
                "ports added: 5, 6",
                "ports removed: 4",
                'ports moved: 2 ("a" -> "b")',
                'apps added: "new"',
                'apps removed: "gone"',
                'apps changed: "a" (Ports, Targets), "b" (Ports)',
                "DrainTimeout: 10s -> 1s",
            ],
        )


class WithoutPortsTests(SynchronousTestCase):
    def test_failedPortsTriedAgain(self):
        """
        The configuration that runs after a port failed to bind lacks that
        port, so planning the same file again lists it as added again.
        """
        new = config(app("web", [1, 2]), app("api", [3]))
        running = withoutPorts(new, {2, 3})
        self.assertEqual([a.ports for a in running.apps], [(1,), ()])
        self.assertEqual(planReload(running, new).addedPorts, ((2, "web"), (3, "api")))

    def test_nothingFailed(self):
        new = config(app("web", [1]))
        self.assertIs(withoutPorts(new, set()), new)


class KeyOfTests(SynchronousTestCase):
    def test_keys(self):
        self.assertEqual(
            [keyOf(f) for f in ("ports", "targets", "connectTimeout", "maxConnections")],
            ["Ports", "Targets", "ConnectTimeout", "MaxConnections"],
        )
