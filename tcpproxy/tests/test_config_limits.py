"""
Tests of the resilience keys of the configuration and of C{"Defaults"}.
"""

import ipaddress

from twisted.trial.unittest import SynchronousTestCase

from tcpproxy.config import ConfigError, HealthCheckConfig, parseConfig


def document(app=None, **top):
    base = {"Name": "web", "Ports": [5001], "Targets": ["127.0.0.1:6001"]}
    return {**top, "Apps": [{**base, **(app or {})}]}


class LimitsConfigTests(SynchronousTestCase):
    def refused(self, doc):
        return str(self.assertRaises(ConfigError, parseConfig, doc, "c.json"))

    def test_defaultsOfAbsentKeys(self):
        config = parseConfig(document())
        app = config.apps[0]
        self.assertEqual(
            (app.idleTimeout, app.healthCheck, app.maxConnections, app.bandwidthLimit, app.allow, app.deny),
            (3600.0, None, None, None, (), ()),
        )
        self.assertIsNone(config.maxConnections)

    def test_everyKey(self):
        config = parseConfig(
            document(
                {
                    "IdleTimeout": 0,
                    "HealthCheck": {"Interval": 1, "Fall": 5},
                    "MaxConnections": 100,
                    "MaxConnectionsPerClient": 10,
                    "BandwidthLimit": 125000,
                    "Allow": ["10.0.0.0/8", "::1"],
                    "Deny": ["10.1.0.0/16"],
                },
                MaxConnections=1000,
            )
        )
        app = config.apps[0]
        self.assertEqual(app.healthCheck, HealthCheckConfig(interval=1, timeout=2, rise=2, fall=5))
        self.assertEqual((app.idleTimeout, app.maxConnections, app.maxConnectionsPerClient), (0, 100, 10))
        self.assertEqual(app.bandwidthLimit, 125000)
        self.assertEqual(app.allow, (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("::1/128")))
        self.assertEqual(config.maxConnections, 1000)

    def test_defaultsApplyAndAppWins(self):
        config = parseConfig(
            {
                "Defaults": {"ConnectTimeout": 2, "IdleTimeout": 60, "AccessLog": False},
                "Apps": [
                    {"Name": "a", "Ports": [1], "Targets": ["127.0.0.1:2"]},
                    {"Name": "b", "Ports": [3], "Targets": ["127.0.0.1:4"], "IdleTimeout": 5},
                ],
            }
        )
        a, b = config.apps
        self.assertEqual((a.connectTimeout, a.idleTimeout, a.accessLog), (2, 60, False))
        self.assertEqual((b.connectTimeout, b.idleTimeout, b.accessLog), (2, 5, False))

    def test_badValueInDefaultsNamesDefaults(self):
        self.assertEqual(
            self.refused(document(Defaults={"BandwidthLimit": "fast"})),
            'c.json: "Defaults": key "BandwidthLimit": "fast" '
            "is not a number of bytes per second (1 or more)",
        )

    def test_appKeysNotInDefaults(self):
        self.assertIn(
            '"Defaults": key "Targets": unknown key', self.refused(document(Defaults={"Targets": []}))
        )

    def test_defaultsNotObject(self):
        self.assertIn('"Defaults": [] is not an object', self.refused(document(Defaults=[])))

    def test_badValueInAppNamesApp(self):
        self.assertEqual(
            self.refused(document({"Allow": ["10.0.0.300/8"]})),
            'c.json: app "web": key "Allow": "10.0.0.300/8" is not an IPv4 or IPv6 network '
            '(write it like "10.0.0.0/8" or "::1")',
        )

    def test_refusals(self):
        for app, top, text in [
            ({"MaxConnections": 0}, {}, 'key "MaxConnections": 0 is not a whole number of 1 or more'),
            (
                {"MaxConnectionsPerClient": 1.5},
                {},
                'key "MaxConnectionsPerClient": 1.5 is not a whole number',
            ),
            ({}, {"MaxConnections": True}, 'c.json: key "MaxConnections": true is not a whole number'),
            ({"IdleTimeout": -1}, {}, 'key "IdleTimeout": -1 must be 0 or more seconds'),
            ({"HealthCheck": {"Rise": 0}}, {}, 'key "HealthCheck.Rise": 0 is not a whole number'),
            ({"HealthCheck": {"Interval": 0}}, {}, 'key "HealthCheck.Interval": 0 must be greater than 0'),
            ({"HealthCheck": {"Intervall": 1}}, {}, 'key "HealthCheck": unknown key "Intervall"'),
            ({"HealthCheck": 5}, {}, 'key "HealthCheck": 5 is not an object'),
            ({"Deny": "10.0.0.0/8"}, {}, 'key "Deny": "10.0.0.0/8" is not a list of networks'),
            ({"BandwidthLimit": 0}, {}, 'key "BandwidthLimit": 0 is not a number of bytes per second'),
        ]:
            self.assertIn(text, self.refused(document(app, **top)))
