"""
Tests of the PROXY protocol keys of the configuration, C{"AcceptProxy"} and
C{"SendProxy"}: what they turn into, and each refusal, one line naming the
file, the app, the key and the value.
"""

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.config import AcceptProxyConfig, ConfigError, parseConfig


def document(app=None, **top):
    base = {"Name": "web", "Ports": [5001], "Targets": ["127.0.0.1:6001"]}
    return {**top, "Apps": [{**base, **(app or {})}]}


class ProxyConfigTests(SynchronousTestCase):
    def refused(self, doc) -> str:
        message = str(self.assertRaises(ConfigError, parseConfig, doc, "c.json"))
        self.assertNotIn("\n", message)
        return message

    def test_absent(self) -> None:
        app = parseConfig(document()).apps[0]
        self.assertEqual((app.acceptProxy, app.sendProxy), (None, None))

    def test_accepted(self) -> None:
        app = parseConfig(
            document(
                {
                    "AcceptProxy": {
                        "From": ["10.0.0.0/8", "127.0.0.1/32"],
                        "Required": False,
                        "Timeout": 0.5,
                    },
                    "SendProxy": "v2",
                }
            )
        ).apps[0]
        self.assertEqual(
            app.acceptProxy,
            AcceptProxyConfig(
                (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("127.0.0.1/32")), False, 0.5
            ),
        )
        self.assertEqual(app.sendProxy, 2)
        self.assertEqual(parseConfig(document({"SendProxy": "v1"})).apps[0].sendProxy, 1)

    def test_defaultsOfAcceptProxy(self) -> None:
        """
        C{Required} is true and C{Timeout} 3 s unless given.
        """
        accept = parseConfig(document({"AcceptProxy": {"From": ["::1"]}})).apps[0].acceptProxy
        self.assertEqual((accept.required, accept.timeout), (True, 3.0))

    def test_null(self) -> None:
        """
        C{null} turns either off (it may override C{"Defaults"}).
        """
        config = parseConfig(
            {
                "Defaults": {"AcceptProxy": {"From": ["10.0.0.0/8"]}, "SendProxy": "v1"},
                "Apps": [
                    {"Name": "a", "Ports": [1], "Targets": ["127.0.0.1:2"]},
                    {
                        "Name": "b",
                        "Ports": [3],
                        "Targets": ["127.0.0.1:4"],
                        "AcceptProxy": None,
                        "SendProxy": None,
                    },
                ],
            }
        )
        a, b = config.apps
        self.assertEqual((a.acceptProxy.trusted, a.sendProxy), ((ipaddress.ip_network("10.0.0.0/8"),), 1))
        self.assertEqual((b.acceptProxy, b.sendProxy), (None, None))

    def test_refusals(self) -> None:
        for value, expected in (
            (
                {"SendProxy": "v3"},
                'c.json: app "web": key "SendProxy": "v3" is not a PROXY protocol version; use "v1" or "v2"',
            ),
            ({"SendProxy": 2}, 'c.json: app "web": key "SendProxy": 2 is not a PROXY protocol version'),
            ({"SendProxy": True}, 'key "SendProxy": true is not a PROXY protocol version'),
            (
                {"AcceptProxy": True},
                'c.json: app "web": key "AcceptProxy": true is not an object like {"From"',
            ),
            ({"AcceptProxy": {}}, 'c.json: app "web": key "AcceptProxy.From": missing required key'),
            ({"AcceptProxy": {"From": []}}, 'key "AcceptProxy.From": is empty; list the networks'),
            (
                {"AcceptProxy": {"From": "10.0.0.0/8"}},
                'key "AcceptProxy.From": "10.0.0.0/8" is not a list of networks',
            ),
            (
                {"AcceptProxy": {"From": ["10.0.0.300/8"]}},
                'c.json: app "web": key "AcceptProxy.From": "10.0.0.300/8" is not an IPv4 or IPv6 network',
            ),
            (
                {"AcceptProxy": {"From": ["::1"], "Required": "yes"}},
                'key "AcceptProxy.Required": "yes" is not true or false',
            ),
            (
                {"AcceptProxy": {"From": ["::1"], "Timeout": 0}},
                'key "AcceptProxy.Timeout": 0 must be greater than 0 seconds',
            ),
            (
                {"AcceptProxy": {"From": ["::1"], "Timeout": "3"}},
                'key "AcceptProxy.Timeout": "3" is not a number of seconds',
            ),
            (
                {"AcceptProxy": {"From": ["::1"], "Timeout": 10**7}},
                'key "AcceptProxy.Timeout": 10000000 is outside the range',
            ),
            (
                {"AcceptProxy": {"From": ["::1"], "Form": 1}},
                'key "AcceptProxy.Form": unknown key (did you mean "From"?); '
                "known keys are From, Required, Timeout",
            ),
        ):
            self.assertIn(expected, self.refused(document(value)), value)

    def test_duplicateKey(self) -> None:
        from tcpproxy.config import _JSONObject

        inner = _JSONObject({"From": ["::1"]})
        inner.duplicates = ("From",)
        self.assertIn('key "AcceptProxy.From": written twice', self.refused(document({"AcceptProxy": inner})))

    def test_refusedInDefaults(self) -> None:
        self.assertIn(
            'c.json: "Defaults": key "SendProxy": "v9"',
            self.refused({**document(), "Defaults": {"SendProxy": "v9"}}),
        )


class TargetObjectTests(SynchronousTestCase):
    """
    Targets written as objects, C{{"Address": "host:port", "SendProxy":
    "v2"}}: a target's own C{SendProxy} wins over the app's.
    """

    def refused(self, targets) -> str:
        message = str(self.assertRaises(ConfigError, parseConfig, document({"Targets": targets}), "c.json"))
        self.assertNotIn("\n", message)
        return message

    def test_accepted(self) -> None:
        app = parseConfig(
            document(
                {
                    "Targets": [
                        "127.0.0.1:6001",
                        {"Address": "127.0.0.1:6002", "SendProxy": "v1"},
                        {"Address": "[::1]:6003"},
                        {"Address": "127.0.0.1:6004", "SendProxy": None},
                    ],
                    "SendProxy": "v2",
                }
            )
        ).apps[0]
        self.assertEqual(
            [str(t) for t in app.targets],
            ["127.0.0.1:6001", "127.0.0.1:6002", "[::1]:6003", "127.0.0.1:6004"],
        )
        self.assertEqual([(str(t), v) for t, v in app.targetSendProxy], [("127.0.0.1:6002", 1)])
        self.assertEqual((app.sendProxy, app.sendsProxy), (2, True))

    def test_onlyPerTarget(self) -> None:
        app = parseConfig(document({"Targets": [{"Address": "127.0.0.1:6002", "SendProxy": "v2"}]})).apps[0]
        self.assertEqual((app.sendProxy, app.sendsProxy), (None, True))
        self.assertFalse(parseConfig(document()).apps[0].sendsProxy)

    def test_refusals(self) -> None:
        for targets, expected in (
            (
                [{"Address": "127.0.0.1:1", "SendProxy": "v3"}],
                'c.json: app "web": key "Targets[1].SendProxy": "v3" is not a PROXY protocol version',
            ),
            (
                ["127.0.0.1:1", {"SendProxy": "v1"}],
                'c.json: app "web": key "Targets[2].Address": missing required key',
            ),
            ([{"Address": 5}], 'c.json: app "web": key "Targets": 5 is not a "host:port" string'),
            ([{"Address": "nowhere"}], 'key "Targets": "nowhere" has no port'),
            (
                ["127.0.0.1:1", {"Address": "127.0.0.1:1", "SendProxy": "v1"}],
                'key "Targets": "127.0.0.1:1" is listed twice',
            ),
            ([{"Adress": "127.0.0.1:1"}], 'key "Targets[1].Adress": unknown key (did you mean "Address"?)'),
        ):
            self.assertIn(expected, self.refused(targets), targets)

    def test_reloadSeesAChange(self) -> None:
        """
        A target's C{SendProxy} changed is a change of the app (a reload
        applies it), reported as one of its C{Targets}.
        """
        from tcpproxy.reload import planReload

        before = parseConfig(document({"Targets": [{"Address": "127.0.0.1:1", "SendProxy": "v1"}]}))
        after = parseConfig(document({"Targets": [{"Address": "127.0.0.1:1", "SendProxy": "v2"}]}))
        self.assertNotEqual(before.apps[0], after.apps[0])
        [change] = planReload(before, after).changedApps
        self.assertEqual(change.keys, ("Targets",))
