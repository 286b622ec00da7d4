"""
A fuzz test of the configuration: random mutations of valid configuration
files -- values of the wrong type or size, deep nesting, unicode, keys
written twice, lists grown large, the text cut short -- each of which must
either load or be refused with the project's L{ConfigError}, never escape as
another exception (which a user would see as a traceback).

Seeded and bounded, so that it runs in a few seconds and a failure names
the case that reproduces it.
"""

from __future__ import annotations

import json
import os
import random

from twisted.trial.unittest import TestCase

from tcpproxy.config import ConfigError, loadConfig
from tcpproxy.tests.certs import writePKI
from tcpproxy.tls import loadAppTLS

SEED = 12
CASES = 400

EXTREMES = [10**400, -(10**400), 1e-300, 1e308, "a\u0000b", "\ud800", None, 0, -1, "", [], {}]
"""
Values that once escaped as exceptions, or sit at the edge of a range.
"""


class Raw(str):
    """
    JSON text put into a document as it is (nesting too deep to build as
    Python values).
    """


class Pairs(list):
    """
    A JSON object as a list of C{(key, value)}: it may hold a key twice.
    """


def render(value: object) -> str:
    """
    JSON text of C{value}, where a L{Pairs} is an object (duplicates kept).
    """
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ", ".join(f"{json.dumps(k)}: {render(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return render(Pairs(value.items()))
    if isinstance(value, list):
        return "[" + ", ".join(render(v) for v in value) + "]"
    if isinstance(value, float) and value != value:
        return "NaN"
    return json.dumps(value)


def seeds() -> list[dict]:
    """
    Valid configurations that use every key, the mutations' starting points.
    """
    return [
        {
            "BindAddress": "127.0.0.1",
            "DrainTimeout": 3,
            "MaxConnections": 100,
            "Defaults": {"ConnectTimeout": 2, "IdleTimeout": 30, "HealthCheck": {"Interval": 1}},
            "Apps": [
                {
                    "Name": "plain",
                    "Ports": [5001, 5002],
                    "Targets": ["127.0.0.1:6001", "backend.test:6002", "[::1]:6003"],
                    "AccessLog": False,
                    "MaxConnections": 10,
                    "MaxConnectionsPerClient": 2,
                    "BandwidthLimit": 100000,
                    "Allow": ["127.0.0.0/8", "::1"],
                    "Deny": ["127.0.0.9"],
                    "HealthCheck": {"Interval": 5, "Timeout": 2, "Rise": 2, "Fall": 3},
                },
                {
                    "Name": "secure",
                    "Ports": [8443],
                    "Targets": ["127.0.0.1:9001"],
                    "TLS": {
                        "Certificates": [
                            {"Cert": "alpha.pem", "Key": "alpha.key"},
                            {"Cert": "gamma-chain.pem", "Key": "gamma.key"},
                        ],
                        "MinVersion": "1.3",
                        "HandshakeTimeout": 5,
                    },
                    "TargetTLS": {
                        "CA": "ca.pem",
                        "ServerName": "backend.test",
                        "Cert": "client.pem",
                        "Key": "client.key",
                        "Verify": True,
                    },
                },
            ],
        },
        {"Apps": [{"Name": "tiny", "Ports": [1], "Targets": ["h:1"]}]},
    ]


def randomValue(rng: random.Random, depth: int = 0) -> object:
    """
    A value of any JSON type, often one that is wrong or extreme.
    """
    kind = rng.randrange(16 if depth < 3 else 12)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 65535, 65536, 2**31, 2**63, 10**400, -(10**400)])
    if kind == 3:
        return rng.choice([0.0, -0.0, 1e-300, 5e-324, 0.5, 1e308, -1e308, 0.001, 0.01, 604800.5])
    if kind == 4:
        return rng.choice(["", " ", "127.0.0.1:1", "[::1]:1", "::1", "h:0", "a" * 300, "1.2", "1.3"])
    if kind == 5:
        return rng.choice(
            ["\u0000", "a\u0000b", "\ud800", "\udcff", "caf\u00e9", "\u202e\u0301", "\U0001f600"]
        )
    if kind == 6:
        return rng.choice(["ca.pem", "alpha.pem", "alpha.key", "nope.pem", "/", ".", "~", "~nobody/x"])
    if kind == 7:
        return rng.choice(["10.0.0.0/8", "::/0", "300.1.1.1", "1.2.3.4/33", "fe80::1%eth0"])
    if kind == 8:
        return "".join(chr(rng.randrange(0x20, 0x3000)) for _ in range(rng.randrange(1, 12)))
    if kind == 9:
        return rng.choice([[], {}, [[]], [{}], {"": None}])
    if kind == 10:
        levels = rng.choice([5, 15, 16, 17, 40, 1200, 100_000])
        if rng.random() < 0.5:
            return Raw("[" * levels + "]" * levels)
        return Raw('{"k": ' * levels + "1" + "}" * levels)
    if kind == 11:
        return float("nan") if rng.random() < 0.5 else rng.choice([float("inf"), float("-inf")])
    if kind in (12, 13):
        return [randomValue(rng, depth + 1) for _ in range(rng.randrange(0, 4))]
    return {rng.choice(["Name", "Ports", "Interval", "Cert", "x"]): randomValue(rng, depth + 1)}


def containers(value: object, found: list) -> list:
    """
    Every object and list in C{value}, depth first (an object already
    given a duplicate key is left as it is).
    """
    if isinstance(value, (dict, list)) and not isinstance(value, Pairs):
        found.append(value)
        for child in value.values() if isinstance(value, dict) else value:
            containers(child, found)
    return found


def mutate(rng: random.Random, document: dict) -> object:
    """
    One to three random changes to C{document} (changed in place).
    """
    for _ in range(rng.randrange(1, 4)):
        target = rng.choice(containers(document, []))
        action = rng.randrange(7)
        if isinstance(target, dict) and target:
            key = rng.choice(list(target))
            if action <= 1:
                target[key] = randomValue(rng)
            elif action == 2:
                target[key] = rng.choice(EXTREMES)
            elif action == 3:
                del target[key]
            elif action == 4:
                target[rng.choice(["Nmae", "", "\u0000", "Ports ", "é", key.lower()])] = randomValue(rng)
            elif action == 5:
                # Written twice: the mutated object becomes a list of pairs.
                pairs = Pairs(target.items())
                pairs.insert(rng.randrange(len(pairs) + 1), (key, randomValue(rng)))
                parent = [c for c in containers(document, []) if any(v is target for v in _children(c))]
                for container in parent:
                    _replace(container, target, pairs)
                if target is document:
                    return pairs
            else:
                value = target[key]
                if isinstance(value, list) and 0 < len(value) < 100:
                    # As long as the longest a list can be (65,535 ports), not longer.
                    target[key] = value * rng.choice([2, 100, 70000 // len(value)])
        elif isinstance(target, list):
            if action <= 2 and target:
                target[rng.randrange(len(target))] = randomValue(rng)
            elif action == 3 and target:
                target.pop(rng.randrange(len(target)))
            else:
                target.append(randomValue(rng))
    return document


def _children(container) -> list:
    return list(container.values()) if isinstance(container, dict) else list(container)


def _replace(container, old, new) -> None:
    if isinstance(container, dict):
        for key, value in container.items():
            if value is old:
                container[key] = new
    else:
        for index, value in enumerate(container):
            if value is old:
                container[index] = new


class ConfigFuzzTests(TestCase):
    def test_noTraceback(self) -> None:
        """
        Every mutated file either loads (and its TLS files load or are
        refused) or is refused with a L{ConfigError} of one line.
        """
        folder = writePKI(os.path.abspath(self.mktemp()))
        path = os.path.join(folder, "config.json")
        rng = random.Random(SEED)
        escaped = []
        outcomes = {"loaded": 0, "refused": 0}
        for case in range(CASES):
            document = mutate(rng, json.loads(json.dumps(rng.choice(seeds()))))
            text = render(document).encode("utf-8", "surrogatepass")
            cut = rng.random()
            if cut < 0.05:
                text = text[: rng.randrange(len(text) + 1)]
            elif cut < 0.1:
                text = b"\xef\xbb\xbf" + text
            with open(path, "wb") as f:
                f.write(text)
            try:
                config = loadConfig(path)
                for app in config.apps:
                    loadAppTLS(app, config.source)
            except ConfigError as e:
                outcomes["refused"] += 1
                if "\n" in str(e):
                    escaped.append(f"case {case}: a message of several lines: {str(e)[:200]!r}")
            except Exception as e:
                escaped.append(f"case {case}: {type(e).__name__}: {e!s:.200} for {text[:300]!r}")
            else:
                outcomes["loaded"] += 1
        self.assertEqual(escaped, [])
        # The mutations are not all refused by the first check they meet.
        self.assertGreater(outcomes["loaded"], CASES // 50, outcomes)
        self.assertGreater(outcomes["refused"], CASES // 2, outcomes)
