"""
Tests for L{tcpproxy.config}: every refusal a user can meet, read as the
user reads it, and the values an accepted file turns into.

A refusal is checked through L{loadConfig} on a real file, because that is
how a user meets it: the message must start with the file's name and go on
to name the app, the key and the offending value as they were written.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import FrozenInstanceError

from twisted.trial.unittest import SkipTest, TestCase

from tcpproxy.config import (
    DEFAULT_BIND_ADDRESS,
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_DRAIN_TIMEOUT,
    HOSTNAME,
    IPV4,
    IPV6,
    AppConfig,
    ConfigError,
    ProxyConfig,
    Target,
    loadConfig,
    parseConfig,
    parseTarget,
)

SHIPPED_CONFIG = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, os.pardir, "config.json")
"""
The repository's own C{config.json}: the repository root is two folders up
from this test module (absent when the package is installed elsewhere).
"""


def app(name: str = "web", **keys: object) -> dict:
    """
    A valid app entry; C{keys} replace or add keys, a value of C{None}
    removes that key.
    """
    entry: dict = {"Name": name, "Ports": [8080], "Targets": ["127.0.0.1:9090"]}
    for key, value in keys.items():
        if value is None:
            entry.pop(key, None)
        else:
            entry[key] = value
    return entry


def document(*apps: dict, **top: object) -> dict:
    """
    A valid top-level document holding C{apps} (one default app if none).
    """
    result: dict = {"Apps": list(apps) or [app()]}
    result.update(top)
    return result


class ConfigFileMixin:
    """
    Write configuration files and check what L{loadConfig} makes of them.
    """

    def writeConfig(self, content: object) -> str:
        """
        Write C{content} to a new file: bytes and text as they are, anything
        else as JSON.

        @return: the file's path.
        """
        if isinstance(content, str):
            content = content.encode("utf-8")
        elif not isinstance(content, bytes):
            content = json.dumps(content, indent=2).encode("utf-8")
        path = os.path.abspath(self.mktemp()) + ".json"
        with open(path, "wb") as f:
            f.write(content)
        return path

    def assertRefusedFile(self, path: str, *fragments: str) -> str:
        """
        Assert that loading C{path} is refused with one line that starts with
        the path and contains every one of C{fragments}.

        @return: the message.
        """
        error = self.assertRaises(ConfigError, loadConfig, path)
        message = str(error)
        self.assertTrue(message.startswith(path + ": "), f"{message!r} does not start with the file name")
        self.assertNotIn("\n", message)
        for fragment in fragments:
            self.assertIn(fragment, message)
        return message

    def assertRefused(self, content: object, *fragments: str) -> str:
        """
        Assert that a file holding C{content} is refused; see
        L{assertRefusedFile}.
        """
        return self.assertRefusedFile(self.writeConfig(content), *fragments)


class FileRefusalTests(ConfigFileMixin, TestCase):
    """
    A file that cannot be read or decoded is refused, naming the file and
    what is wrong with it.
    """

    def test_missingFile(self) -> None:
        path = os.path.abspath(self.mktemp())
        self.assertRefusedFile(path, "cannot read the configuration file", "No such file or directory")

    def test_directory(self) -> None:
        path = os.path.abspath(self.mktemp())
        os.mkdir(path)
        self.assertRefusedFile(path, "cannot read the configuration file", "Is a directory")

    def test_unreadable(self) -> None:
        if os.geteuid() == 0:
            raise SkipTest("the superuser reads a file whatever its permissions")
        path = self.writeConfig(document())
        os.chmod(path, 0)
        self.assertRefusedFile(path, "cannot read the configuration file", "Permission denied")

    def test_invalidJSON(self) -> None:
        """
        A syntax error is located by line and column.
        """
        self.assertRefused(
            '{\n  "Apps": [\n    {"Name": "web" "Ports": [1]}\n  ]\n}',
            "invalid JSON at line 3 column 20",
            "Expecting ',' delimiter",
        )

    def test_emptyFile(self) -> None:
        self.assertRefused(b"", "invalid JSON at line 1 column 1")

    def test_notUTF8(self) -> None:
        """
        A file in another encoding is refused, pointing at the first bad byte.
        """
        self.assertRefused(b'{"Apps": [{"Name": "caf\xe9"}]}', "not UTF-8 text", "at byte 23")

    def test_duplicateTopLevelKey(self) -> None:
        """
        JSON lets a key appear twice and keeps the last; a configuration
        refuses it, since one of the two is surely a mistake.
        """
        self.assertRefused(
            '{"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"]}],\n'
            ' "Apps": [{"Name": "b", "Ports": [2], "Targets": ["h:2"]}]}',
            'key "Apps": written twice',
        )

    def test_duplicateAppKey(self) -> None:
        """
        A key twice in one app is refused, and the message says in which app:
        with several apps, each with its own "Ports", the key alone does not
        tell the user where to look.
        """
        self.assertRefused(
            '{"Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"]},\n'
            '          {"Name": "web", "Ports": [2], "Ports": [3], "Targets": ["h:2"]}]}',
            'key "Ports": written twice',
            "web",
        )


class DocumentRefusalTests(ConfigFileMixin, TestCase):
    """
    Refusals of the top level of the document.
    """

    def test_topLevelNotObject(self) -> None:
        self.assertRefused([1, 2], "the top level is [1, 2]", "not an object")

    def test_missingApps(self) -> None:
        self.assertRefused({}, 'key "Apps"', "missing required key")

    def test_appsNotList(self) -> None:
        self.assertRefused({"Apps": {"Name": "web"}}, 'key "Apps"', '{"Name": "web"}', "not a list")

    def test_emptyApps(self) -> None:
        self.assertRefused({"Apps": []}, 'key "Apps"', "is empty")

    def test_unknownTopLevelKeyWithHint(self) -> None:
        """
        A misspelt key is refused with the key it probably meant.
        """
        self.assertRefused(
            document(DrainTimout=5),
            'key "DrainTimout"',
            "unknown key",
            'did you mean "DrainTimeout"?',
        )

    def test_unknownTopLevelKeyWithoutHint(self) -> None:
        """
        A key like no known one gets the list of known keys, and no guess.
        """
        message = self.assertRefused(
            document(Colour="blue"), 'key "Colour"', "unknown key", "Apps, BindAddress, DrainTimeout"
        )
        self.assertNotIn("did you mean", message)

    def test_bindAddressHostname(self) -> None:
        self.assertRefused(
            document(BindAddress="localhost"),
            'key "BindAddress"',
            '"localhost"',
            "not an IPv4 or IPv6 address",
        )

    def test_bindAddressBracketed(self) -> None:
        self.assertRefused(document(BindAddress="[::1]"), 'key "BindAddress"', '"[::1]"')

    def test_bindAddressNotString(self) -> None:
        self.assertRefused(document(BindAddress=127), 'key "BindAddress"', "127 is not")

    def test_drainTimeoutString(self) -> None:
        self.assertRefused(
            document(DrainTimeout="10"), 'key "DrainTimeout"', '"10"', "not a number of seconds"
        )

    def test_drainTimeoutBoolean(self) -> None:
        self.assertRefused(document(DrainTimeout=True), 'key "DrainTimeout"', "true", "not a number")

    def test_drainTimeoutNegative(self) -> None:
        self.assertRefused(document(DrainTimeout=-1), 'key "DrainTimeout"', "-1", "0 or more")

    def test_drainTimeoutNaN(self) -> None:
        """
        Python's JSON decoder accepts the literal C{NaN}; it is no duration.
        """
        self.assertRefused(
            '{"DrainTimeout": NaN, "Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"]}]}',
            'key "DrainTimeout"',
            "NaN is not a number of seconds",
        )

    def test_drainTimeoutInfinity(self) -> None:
        """
        Nor is C{Infinity}, or a number too large to be anything else.
        """
        for literal in ("Infinity", "1e999"):
            self.assertRefused(
                '{"DrainTimeout": '
                + literal
                + ', "Apps": [{"Name": "a", "Ports": [1], "Targets": ["h:1"]}]}',
                'key "DrainTimeout"',
                "not a number of seconds",
            )


class AppRefusalTests(ConfigFileMixin, TestCase):
    """
    Refusals of one app's entry: each names the app, the key and the value.
    """

    def test_appNotObject(self) -> None:
        self.assertRefused(document(app(), "web"), 'key "Apps"', "entry 2", '"web"', "not an object")

    def test_missingName(self) -> None:
        self.assertRefused(
            document(app("a"), app(Name=None)), 'key "Name"', "missing required key", 'entry 2 of "Apps"'
        )

    def test_nameNotString(self) -> None:
        self.assertRefused(document(app(Name=5)), 'key "Name"', "5 in entry 1", "not a non-empty string")

    def test_nameBlank(self) -> None:
        self.assertRefused(document(app(Name="  ")), 'key "Name"', '"  " in entry 1', "not a non-empty")

    def test_missingPorts(self) -> None:
        self.assertRefused(document(app(Ports=None)), 'app "web"', 'key "Ports"', "missing required key")

    def test_missingTargets(self) -> None:
        self.assertRefused(document(app(Targets=None)), 'app "web"', 'key "Targets"', "missing required key")

    def test_unknownAppKeyWithHint(self) -> None:
        self.assertRefused(
            document(app(Tragets=["127.0.0.1:1"])),
            'app "web"',
            'key "Tragets"',
            "unknown key",
            'did you mean "Targets"?',
        )

    def test_duplicateName(self) -> None:
        self.assertRefused(
            document(app("web", Ports=[1]), app("web", Ports=[2])),
            'app "web"',
            'key "Name"',
            '"web" is the name of another app',
        )

    def test_connectTimeoutString(self) -> None:
        self.assertRefused(
            document(app(ConnectTimeout="5")),
            'app "web"',
            'key "ConnectTimeout"',
            '"5" is not a number of seconds',
        )

    def test_connectTimeoutNegative(self) -> None:
        self.assertRefused(
            document(app(ConnectTimeout=-2.5)), 'app "web"', 'key "ConnectTimeout"', "-2.5", "greater than 0"
        )

    def test_connectTimeoutZero(self) -> None:
        """
        A connect timeout of 0 would fail every attempt: it is refused.
        """
        self.assertRefused(
            document(app(ConnectTimeout=0)), 'app "web"', 'key "ConnectTimeout"', "0 must be greater than 0"
        )

    def test_accessLogNotBoolean(self) -> None:
        self.assertRefused(
            document(app(AccessLog="no")), 'app "web"', 'key "AccessLog"', '"no" is not true or false'
        )

    def test_connectTimeoutInfinity(self) -> None:
        self.assertRefused(
            '{"Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"], "ConnectTimeout": Infinity}]}',
            'app "web"',
            'key "ConnectTimeout"',
            "Infinity is not a number of seconds",
        )


class PortRefusalTests(ConfigFileMixin, TestCase):
    """
    Refusals of an app's C{"Ports"}.
    """

    def test_notList(self) -> None:
        self.assertRefused(document(app(Ports=8080)), 'app "web"', 'key "Ports"', "8080 is not a list")

    def test_empty(self) -> None:
        self.assertRefused(document(app(Ports=[])), 'app "web"', 'key "Ports"', "is empty")

    def test_string(self) -> None:
        self.assertRefused(
            document(app(Ports=["8080"])), 'app "web"', 'key "Ports"', '"8080" is not a port number'
        )

    def test_true(self) -> None:
        """
        C{true} is no port, although Python counts it as the integer 1.
        """
        self.assertRefused(document(app(Ports=[True])), 'app "web"', 'key "Ports"', "true is not a port")

    def test_false(self) -> None:
        self.assertRefused(document(app(Ports=[False])), 'app "web"', 'key "Ports"', "false is not a port")

    def test_float(self) -> None:
        self.assertRefused(document(app(Ports=[8080.0])), 'app "web"', 'key "Ports"', "8080.0 is not a port")

    def test_null(self) -> None:
        self.assertRefused(document(app(Ports=[None])), 'app "web"', 'key "Ports"', "null is not a port")

    def test_zero(self) -> None:
        self.assertRefused(
            document(app(Ports=[0])), 'app "web"', 'key "Ports"', "0 is outside the port range"
        )

    def test_tooLarge(self) -> None:
        self.assertRefused(
            document(app(Ports=[65536])),
            'app "web"',
            'key "Ports"',
            "65536 is outside the port range 1-65535",
        )

    def test_negative(self) -> None:
        self.assertRefused(document(app(Ports=[-80])), 'app "web"', 'key "Ports"', "-80 is outside")

    def test_listedTwice(self) -> None:
        self.assertRefused(
            document(app(Ports=[8080, 8081, 8080])), 'app "web"', 'key "Ports"', "8080 is listed twice"
        )

    def test_sharedByTwoApps(self) -> None:
        """
        A port can serve one app only; the message names both.
        """
        self.assertRefused(
            document(app("first", Ports=[1, 8080]), app("second", Ports=[8080])),
            'app "second"',
            'key "Ports"',
            '8080 is already a port of app "first"',
        )


class TargetRefusalTests(ConfigFileMixin, TestCase):
    """
    Refusals of an app's C{"Targets"}: the message quotes the target as it
    was written and says what is wrong with it.
    """

    def assertTargetRefused(self, target: object, *fragments: str) -> str:
        return self.assertRefused(document(app(Targets=[target])), 'app "web"', 'key "Targets"', *fragments)

    def test_notList(self) -> None:
        self.assertRefused(
            document(app(Targets="127.0.0.1:9090")),
            'app "web"',
            'key "Targets"',
            '"127.0.0.1:9090" is not a list',
        )

    def test_empty(self) -> None:
        self.assertRefused(document(app(Targets=[])), 'app "web"', 'key "Targets"', "is empty")

    def test_notString(self) -> None:
        self.assertTargetRefused(9090, '9090 is not a "host:port" string')

    def test_object(self) -> None:
        """
        A target written as an object has an C{"Address"} (and may have a
        C{"SendProxy"}, a C{"Weight"}...); anything else in it is refused, naming the key.
        """
        self.assertRefused(
            document(app(Targets=[{"host": "h"}])),
            'app "web"',
            'key "Targets[1].host": unknown key; known keys are Address, SendProxy, Weight, '
            "MaxConnections, Backup",
        )

    def test_noPort(self) -> None:
        self.assertTargetRefused("backend", '"backend" has no port')

    def test_emptyPort(self) -> None:
        self.assertTargetRefused("backend:", "\"backend:\" has '' as its port")

    def test_nonNumericPort(self) -> None:
        self.assertTargetRefused(
            "backend:http", "\"backend:http\" has 'http' as its port, which is not a number"
        )

    def test_nonASCIIDigitPort(self) -> None:
        """
        Digits of other scripts are digits to Python, but no port.
        """
        self.assertTargetRefused("backend:\u0668\u0660", "as its port, which is not a number")

    def test_portOutOfRange(self) -> None:
        self.assertTargetRefused("backend:65536", '"backend:65536" has port 65536, outside the range 1-65535')

    def test_portZero(self) -> None:
        self.assertTargetRefused("backend:0", "has port 0, outside the range")

    def test_noHost(self) -> None:
        self.assertTargetRefused(":9090", '":9090" has no host')

    def test_badHostname(self) -> None:
        self.assertTargetRefused("back end:9090", "\"back end:9090\" has 'back end', which is neither")

    def test_hostnameLeadingDash(self) -> None:
        self.assertTargetRefused("-backend:9090", "'-backend', which is neither")

    def test_ipv6WithoutBrackets(self) -> None:
        self.assertTargetRefused("::1:9090", '"::1:9090" is an IPv6 address without brackets')

    def test_ipv6NoClosingBracket(self) -> None:
        self.assertTargetRefused("[::1:9090", "\"[::1:9090\" has no closing ']'")

    def test_ipv6NoPort(self) -> None:
        self.assertTargetRefused("[::1]", '"[::1]" has no port')

    def test_ipv6NoColon(self) -> None:
        self.assertTargetRefused("[::1]9090", '"[::1]9090" has no port')

    def test_ipv4InBrackets(self) -> None:
        self.assertTargetRefused("[127.0.0.1]:9090", "'127.0.0.1' in brackets, which is not an IPv6 address")

    def test_emptyBrackets(self) -> None:
        self.assertTargetRefused("[]:9090", "'' in brackets")

    def test_ipv6Zone(self) -> None:
        """
        A zone id cannot be dialled by the endpoints: refused, not left to
        fail in the accept path.
        """
        self.assertTargetRefused(
            "[::1%lo]:7302", "'::1%lo', an IPv6 address with a zone id, which is not supported"
        )
        self.assertTargetRefused("[fe80::1%eth0]:80", "zone id")

    def test_notADNSName(self) -> None:
        """
        A label over 63 characters, a name over 253, an empty label: each
        named in the one-line refusal.
        """
        self.assertTargetRefused(
            "a" * 64 + ".example:80", "not a valid DNS name", "64 characters long (at most 63)"
        )
        self.assertTargetRefused(
            ".".join(["b" * 63] * 4) + ":80", "not a valid DNS name", "255 characters long (at most 253)"
        )
        self.assertTargetRefused("backend..internal:80", "'backend..internal', which is neither")
        self.assertTargetRefused(
            "backend.internal..:80", "'backend.internal..', which is not a valid DNS name", "empty label"
        )
        longest = ".".join(["c" * 63, "c" * 63, "c" * 63, "c" * 61])
        self.assertEqual(
            parseConfig(document(app(Targets=[longest + ".:80"]))).apps[0].targets[0].host, longest
        )

    def test_serverNameNotADNSName(self) -> None:
        self.assertRefused(
            document(app(TargetTLS={"ServerName": "x" * 64 + ".test"})),
            'key "TargetTLS.ServerName"',
            "64 characters long",
        )

    def test_namesAsWritten(self) -> None:
        """
        Names in capitals or fully qualified (a trailing dot) are the same
        name: kept lower-case without the dot, and a duplicate of the plain
        form is refused as one.
        """
        loaded = parseConfig(
            document(
                app(Targets=["Backend.Internal.:80", "LOCALHOST:81"], TargetTLS={"ServerName": "API.Test."})
            )
        )
        self.assertEqual([str(t) for t in loaded.apps[0].targets], ["backend.internal:80", "localhost:81"])
        self.assertEqual(loaded.apps[0].targetTLS.serverName, "api.test")
        self.assertRefused(
            document(app(Targets=["backend.internal:80", "BACKEND.internal.:80"])),
            '"BACKEND.internal.:80" is listed twice',
        )

    def test_ipv6AsWritten(self) -> None:
        """
        An IPv6 address is kept in its one text form (RFC 5952: lower-case,
        zeros compressed, an IPv4-mapped address with its IPv4 part dotted),
        so that two spellings of one address are a duplicate, and metrics
        labels and the admin endpoint's target names do not depend on how
        it was written.
        """
        loaded = parseConfig(
            document(app(Targets=["[2001:DB8:0:0::1]:80", "[::FFFF:7f00:1]:81", "[0:0:0:0:0:0:0:1]:82"]))
        )
        self.assertEqual(
            [str(t) for t in loaded.apps[0].targets],
            ["[2001:db8::1]:80", "[::ffff:127.0.0.1]:81", "[::1]:82"],
        )
        self.assertRefused(
            document(app(Targets=["[::1]:80", "[0:0::1]:80"])),
            '"[0:0::1]:80" is listed twice',
        )

    def test_listedTwice(self) -> None:
        self.assertRefused(
            document(app(Targets=["127.0.0.1:9090", "127.0.0.1:9091", "127.0.0.1:9090"])),
            'app "web"',
            'key "Targets"',
            '"127.0.0.1:9090" is listed twice',
        )

    def test_listedTwiceWithSpaces(self) -> None:
        """
        Surrounding spaces are ignored, so they do not make a second target.
        """
        self.assertRefused(
            document(app(Targets=["127.0.0.1:9090", " 127.0.0.1:9090 "])),
            'key "Targets"',
            '" 127.0.0.1:9090 " is listed twice',
        )


class ParseTargetTests(TestCase):
    """
    L{parseTarget} tells the kinds of target apart, and C{str()} gives back
    the form it parses.
    """

    def assertTarget(self, text: str, host: str, port: int, kind: str) -> None:
        target = parseTarget(text)
        self.assertEqual(target, Target(host, port, kind))
        self.assertEqual(str(target), text)
        self.assertEqual(parseTarget(str(target)), target)

    def test_ipv4(self) -> None:
        self.assertTarget("127.0.0.1:6001", "127.0.0.1", 6001, IPV4)

    def test_ipv6(self) -> None:
        self.assertTarget("[::1]:7001", "::1", 7001, IPV6)

    def test_ipv6Full(self) -> None:
        self.assertTarget("[2001:db8::10]:443", "2001:db8::10", 443, IPV6)

    def test_hostname(self) -> None:
        self.assertTarget("backend.example:6002", "backend.example", 6002, HOSTNAME)

    def test_singleLabelHostname(self) -> None:
        self.assertTarget("localhost:80", "localhost", 80, HOSTNAME)

    def test_portBounds(self) -> None:
        self.assertTarget("h:1", "h", 1, HOSTNAME)
        self.assertTarget("h:65535", "h", 65535, HOSTNAME)

    def test_invalidRaisesValueError(self) -> None:
        """
        L{parseTarget} itself raises L{ValueError}, for callers other than
        the configuration (such as C{--demo-down}) to word their own message.
        """
        self.assertRaises(ValueError, parseTarget, "no-port")


class AcceptedConfigTests(ConfigFileMixin, TestCase):
    """
    What an accepted configuration turns into.
    """

    def test_accessLog(self) -> None:
        """
        C{AccessLog} is on unless an app turns it off.
        """
        config = parseConfig(document(app("a", Ports=[1]), app("b", Ports=[2], AccessLog=False)))
        self.assertEqual([a.accessLog for a in config.apps], [True, False])

    def test_shippedConfig(self) -> None:
        """
        The repository's C{config.json}: three apps on twelve ports.
        """
        if not os.path.exists(SHIPPED_CONFIG):
            raise SkipTest(f"{SHIPPED_CONFIG} is not there: the package is not run from its repository")
        path = os.path.normpath(SHIPPED_CONFIG)
        config = loadConfig(path)
        self.assertEqual(config.source, path)
        self.assertEqual(config.bindAddress, "127.0.0.1")
        self.assertEqual(config.drainTimeout, 10.0)
        self.assertEqual(str(config.admin), "127.0.0.1:9901")
        self.assertEqual([a.name for a in config.apps], ["five-thousand", "six-thousand", "seven-thousand"])
        self.assertEqual(len(config.listeners()), 12)
        self.assertEqual(
            {a.name: a.ports for a in config.apps},
            {
                "five-thousand": (5001, 5200, 5300, 5400),
                "six-thousand": (6100, 6200, 6300, 6400),
                "seven-thousand": (7100, 7200, 7300, 7400),
            },
        )
        self.assertEqual(
            {a.name: [str(t) for t in a.targets] for a in config.apps},
            {
                "five-thousand": ["127.0.0.1:6001", "127.0.0.1:6002", "127.0.0.1:6003"],
                "six-thousand": ["127.0.0.1:7001", "127.0.0.1:7002"],
                "seven-thousand": ["127.0.0.1:8001", "127.0.0.1:8002", "127.0.0.1:8003"],
            },
        )

    def test_everyKey(self) -> None:
        """
        Every key, given, is taken; order of ports and targets is kept.
        """
        path = self.writeConfig(
            {
                "BindAddress": "::1",
                "DrainTimeout": 2.5,
                "Apps": [
                    {
                        "Name": "mixed",
                        "Ports": [9002, 9001],
                        "Targets": ["backend.example:6002", "127.0.0.1:6001", "[::1]:7001"],
                        "ConnectTimeout": 0.5,
                    }
                ],
            }
        )
        config = loadConfig(path)
        self.assertEqual(
            config,
            ProxyConfig(
                apps=(
                    AppConfig(
                        "mixed",
                        (9002, 9001),
                        (
                            Target("backend.example", 6002, HOSTNAME),
                            Target("127.0.0.1", 6001, IPV4),
                            Target("::1", 7001, IPV6),
                        ),
                        0.5,
                    ),
                ),
                bindAddress="::1",
                drainTimeout=2.5,
                source=path,
            ),
        )
        self.assertEqual(
            [str(t) for t in config.apps[0].targets],
            ["backend.example:6002", "127.0.0.1:6001", "[::1]:7001"],
        )

    def test_defaults(self) -> None:
        config = parseConfig(document())
        self.assertEqual(config.bindAddress, "0.0.0.0")
        self.assertEqual(config.bindAddress, DEFAULT_BIND_ADDRESS)
        self.assertEqual(config.drainTimeout, 10.0)
        self.assertEqual(config.drainTimeout, DEFAULT_DRAIN_TIMEOUT)
        self.assertEqual(config.apps[0].connectTimeout, 5.0)
        self.assertEqual(config.apps[0].connectTimeout, DEFAULT_CONNECT_TIMEOUT)
        self.assertEqual(config.source, "<config>")

    def test_emptyBindAddressIsDefault(self) -> None:
        self.assertEqual(parseConfig(document(BindAddress="")).bindAddress, DEFAULT_BIND_ADDRESS)

    def test_drainTimeoutZero(self) -> None:
        """
        A drain period of 0 is allowed: stop at once, aborting what is open.
        """
        self.assertEqual(parseConfig(document(DrainTimeout=0)).drainTimeout, 0.0)

    def test_targetSpacesStripped(self) -> None:
        config = parseConfig(document(app(Targets=[" 127.0.0.1:9090 "])))
        self.assertEqual(config.apps[0].targets, (Target("127.0.0.1", 9090, IPV4),))

    def test_listenersInOrder(self) -> None:
        config = parseConfig(document(app("a", Ports=[3, 1]), app("b", Ports=[2])))
        self.assertEqual([(a.name, p) for a, p in config.listeners()], [("a", 3), ("a", 1), ("b", 2)])

    def test_frozen(self) -> None:
        """
        A configuration cannot be changed once made: a service holding it
        can rely on what it read.
        """
        config = parseConfig(document())
        appConfig = config.apps[0]
        target = appConfig.targets[0]
        self.assertRaises(FrozenInstanceError, setattr, config, "drainTimeout", 1.0)
        self.assertRaises(FrozenInstanceError, setattr, config, "apps", ())
        self.assertRaises(FrozenInstanceError, setattr, appConfig, "name", "other")
        self.assertRaises(FrozenInstanceError, setattr, appConfig, "ports", (1,))
        self.assertRaises(FrozenInstanceError, setattr, target, "port", 1)
        self.assertIsInstance(config.apps, tuple)
        self.assertIsInstance(appConfig.ports, tuple)
        self.assertIsInstance(appConfig.targets, tuple)


class TLSConfigTests(ConfigFileMixin, TestCase):
    """
    The C{"TLS"} and C{"TargetTLS"} keys of an app: their shape is checked
    here (the files they name are read by L{tcpproxy.tls}), and paths are
    relative to the configuration file's folder.
    """

    def tlsApp(self, **tls: object) -> dict:
        settings: dict = {"Certificates": [{"Cert": "a.pem", "Key": "a.key"}]}
        settings.update(tls)
        return app(TLS={k: v for k, v in settings.items() if v is not None})

    def test_accepted(self) -> None:
        path = self.writeConfig(
            document(
                app(
                    TLS={
                        "Certificates": [
                            {"Cert": "a.pem", "Key": "a.key"},
                            {"Cert": "/abs/b.pem", "Key": "b.key"},
                        ],
                        "MinVersion": "1.3",
                        "HandshakeTimeout": 2.5,
                    },
                    TargetTLS={
                        "CA": "ca.pem",
                        "ServerName": "backend.internal",
                        "Cert": "c.pem",
                        "Key": "c.key",
                    },
                )
            )
        )
        folder = os.path.dirname(path)
        loaded = loadConfig(path).apps[0]
        self.assertEqual(
            loaded.tls.certificates,
            (
                (os.path.join(folder, "a.pem"), os.path.join(folder, "a.key")),
                ("/abs/b.pem", os.path.join(folder, "b.key")),
            ),
        )
        self.assertEqual((loaded.tls.minVersion, loaded.tls.handshakeTimeout), ("1.3", 2.5))
        target = loaded.targetTLS
        self.assertEqual(target.ca, os.path.join(folder, "ca.pem"))
        self.assertEqual((target.serverName, target.verify), ("backend.internal", True))
        self.assertEqual(
            (target.cert, target.key), (os.path.join(folder, "c.pem"), os.path.join(folder, "c.key"))
        )

    def test_defaults(self) -> None:
        loaded = parseConfig(document(self.tlsApp(), app("plain", Ports=[1])))
        self.assertEqual((loaded.apps[0].tls.minVersion, loaded.apps[0].tls.handshakeTimeout), ("1.2", 10.0))
        self.assertIsNone(loaded.apps[0].targetTLS)
        self.assertIsNone(loaded.apps[1].tls)
        self.assertEqual(parseConfig(document(app(TargetTLS={}))).apps[0].targetTLS.ca, None)

    def test_badMinVersion(self) -> None:
        for value in ["1.1", "1.0", 1.2, "TLSv1.2"]:
            self.assertRefused(
                document(self.tlsApp(MinVersion=value)),
                'app "web"',
                'key "TLS.MinVersion"',
                json.dumps(value),
                '"1.2" or "1.3"',
            )

    def test_unknownKey(self) -> None:
        self.assertRefused(
            document(self.tlsApp(MinVerison="1.2")),
            'key "TLS.MinVerison"',
            'did you mean "MinVersion"?',
        )
        self.assertRefused(
            document(app(TargetTLS={"Verfiy": False})), 'key "TargetTLS.Verfiy"', 'did you mean "Verify"?'
        )
        self.assertRefused(
            document(self.tlsApp(Certificates=[{"Cert": "a", "Kye": "b"}])),
            'key "TLS.Certificates[1].Kye"',
            'did you mean "Key"?',
        )

    def test_certificatesMissingOrEmpty(self) -> None:
        self.assertRefused(document(app(TLS={})), 'key "TLS.Certificates"', "missing required key")
        self.assertRefused(document(self.tlsApp(Certificates=[])), 'key "TLS.Certificates"', "is empty")
        self.assertRefused(
            document(self.tlsApp(Certificates=[{"Cert": "a.pem"}])),
            'key "TLS.Certificates[1].Key"',
            "missing",
        )
        self.assertRefused(
            document(self.tlsApp(Certificates=["a.pem"])), 'key "TLS.Certificates[1]"', "is not an object"
        )
        self.assertRefused(
            document(self.tlsApp(Certificates=[{"Cert": "", "Key": "k"}])), "is not a file path"
        )

    def test_notAnObject(self) -> None:
        self.assertRefused(document(app(TLS=True)), 'key "TLS"', "true is not an object")
        self.assertRefused(document(app(TargetTLS="ca.pem")), 'key "TargetTLS"', "is not an object")

    def test_handshakeTimeout(self) -> None:
        self.assertRefused(
            document(self.tlsApp(HandshakeTimeout=0)), 'key "TLS.HandshakeTimeout"', "greater than 0"
        )
        self.assertRefused(document(self.tlsApp(HandshakeTimeout="10")), "is not a number of seconds")

    def test_targetTLSShape(self) -> None:
        self.assertRefused(
            document(app(TargetTLS={"Cert": "c.pem"})), 'key "TargetTLS.Key"', '"Cert" and "Key" go together'
        )
        self.assertRefused(
            document(app(TargetTLS={"Verify": "no"})), 'key "TargetTLS.Verify"', "true or false"
        )
        self.assertRefused(
            document(app(TargetTLS={"ServerName": "not a name"})),
            'key "TargetTLS.ServerName"',
            "not a hostname",
        )

    def test_alpn(self) -> None:
        loaded = parseConfig(document(self.tlsApp(ALPN=["h2", "http/1.1"]), app("plain", Ports=[1])))
        self.assertEqual(loaded.apps[0].tls.alpn, ("h2", "http/1.1"))
        self.assertEqual(parseConfig(document(self.tlsApp())).apps[0].tls.alpn, ())
        for value, fragment in [
            ([], "is not a non-empty list"),
            ("h2", "is not a non-empty list"),
            ([""], '"" is not a protocol name'),
            ([2], "2 is not a protocol name"),
            (["h\u00e9"], "printable ASCII"),
            (["x" * 256], "longer than 255 bytes"),
            (["h2", "http/1.1", "h2"], '"h2" is listed twice'),
        ]:
            self.assertRefused(document(self.tlsApp(ALPN=value)), 'app "web"', 'key "TLS.ALPN"', fragment)

    def test_maxPendingHandshakes(self) -> None:
        self.assertEqual(parseConfig(document(self.tlsApp())).apps[0].tls.maxPendingHandshakes, 1000)
        loaded = parseConfig(document(self.tlsApp(MaxPendingHandshakes=50)))
        self.assertEqual(loaded.apps[0].tls.maxPendingHandshakes, 50)
        for value in (0, -1, 2.5, "10", True):
            self.assertRefused(
                document(self.tlsApp(MaxPendingHandshakes=value)),
                'key "TLS.MaxPendingHandshakes"',
                "is not a whole number of 1 or more",
            )


BIG = 10**400
"""
An integer with 401 digits: valid JSON, too large for a float.
"""


class NoTracebackTests(ConfigFileMixin, TestCase):
    """
    Inputs that once escaped as Python exceptions (C{OverflowError},
    C{RecursionError}, C{ValueError}) get the one-line refusal.
    """

    def test_hugeIntegerForEveryNumber(self) -> None:
        """
        An integer too large for a float, for any key that holds seconds or
        a rate, is refused as out of range, naming the key.
        """
        cases = [
            (document(app(ConnectTimeout=BIG)), 'key "ConnectTimeout"'),
            (document(app(IdleTimeout=BIG)), 'key "IdleTimeout"'),
            (document(DrainTimeout=BIG), 'key "DrainTimeout"'),
            (document(app(HealthCheck={"Interval": BIG})), 'key "HealthCheck.Interval"'),
            (document(app(HealthCheck={"Timeout": BIG})), 'key "HealthCheck.Timeout"'),
            (document(app(BandwidthLimit=BIG)), 'key "BandwidthLimit"'),
            (document(Defaults={"ConnectTimeout": BIG}), '"Defaults": key "ConnectTimeout"'),
            (
                document(app(TLS={"Certificates": [{"Cert": "c", "Key": "k"}], "HandshakeTimeout": BIG})),
                'key "TLS.HandshakeTimeout"',
            ),
        ]
        for content, key in cases:
            message = self.assertRefused(content, key, "1000000000")
            self.assertTrue("outside the range" in message or "more than the largest" in message, message)

    def test_deeplyNested(self) -> None:
        """
        JSON nested a thousand levels deep (or a hundred thousand) is
        refused, naming the key it is under and where it goes too deep.
        """
        for depth in (1000, 100_000):
            deep = "[" * depth + "]" * depth
            self.assertRefused(
                '{"Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"], "ConnectTimeout": '
                + deep
                + "}]}",
                'key "Apps"',
                "nested more than 16 levels deep (at line 1 column",
            )
        self.assertRefused('{"Defaults": ' + "{" * 1000, 'key "Defaults"', "nested more than")

    def test_bracketsInStringsDoNotCount(self) -> None:
        """
        The nesting check skips strings: brackets in a name are just text.
        """
        config = loadConfig(self.writeConfig(document(app("[[[[" * 20 + '\\"{{' * 20))))
        self.assertEqual(config.apps[0].name, "[[[[" * 20 + '\\"{{' * 20)

    def test_nulInPath(self) -> None:
        """
        A NUL character in a TLS file path is refused in the configuration,
        before any file is opened.
        """
        self.assertRefused(
            document(app(TLS={"Certificates": [{"Cert": "a\u0000.pem", "Key": "k.pem"}]})),
            'app "web": key "TLS.Certificates[1].Cert": "a\\u0000.pem" holds a NUL character',
        )
        self.assertRefused(
            document(app(TargetTLS={"CA": "ca\u0000.pem"})),
            'key "TargetTLS.CA": "ca\\u0000.pem" holds a NUL character',
        )

    def test_loneSurrogateInPath(self) -> None:
        self.assertRefused(
            '{"Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"], "TargetTLS": {"CA": "\\ud800"}}]}',
            'key "TargetTLS.CA": "\\ud800" holds a lone surrogate',
        )


class NestedDuplicateTests(ConfigFileMixin, TestCase):
    """
    A key written twice is refused in every object, not only at the top
    level and in an app.
    """

    def test_healthCheck(self) -> None:
        self.assertRefused(
            '{"Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"],'
            ' "HealthCheck": {"Interval": 1, "Interval": 2}}]}',
            'app "web": key "HealthCheck.Interval": written twice',
        )

    def test_defaultsHealthCheck(self) -> None:
        self.assertRefused(
            '{"Defaults": {"HealthCheck": {"Rise": 1, "Rise": 2}},'
            ' "Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"]}]}',
            '"Defaults": key "HealthCheck.Rise": written twice',
        )

    def test_defaults(self) -> None:
        self.assertRefused(
            '{"Defaults": {"IdleTimeout": 1, "IdleTimeout": 2},'
            ' "Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"]}]}',
            '"Defaults": key "IdleTimeout": written twice',
        )

    def test_tlsObjects(self) -> None:
        prefix = '{"Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"], '
        self.assertRefused(
            prefix + '"TLS": {"Certificates": [{"Cert": "a", "Key": "b"}], "MinVersion": "1.2",'
            ' "MinVersion": "1.3"}}]}',
            'key "TLS.MinVersion": written twice',
        )
        self.assertRefused(
            prefix + '"TLS": {"Certificates": [{"Cert": "a", "Key": "b", "Key": "c"}]}}]}',
            'key "TLS.Certificates[1].Key": written twice',
        )
        self.assertRefused(
            prefix + '"TargetTLS": {"Verify": true, "Verify": false}}]}',
            'key "TargetTLS.Verify": written twice',
        )


class RangeTests(ConfigFileMixin, TestCase):
    """
    Every duration is 10 ms to one week (IdleTimeout and DrainTimeout may
    also be 0), every BandwidthLimit 1 to 10^12 bytes per second.
    """

    def test_tooShort(self) -> None:
        for content, key in [
            (document(app(HealthCheck={"Interval": 1e-300})), 'key "HealthCheck.Interval": 1e-300'),
            (document(app(HealthCheck={"Timeout": 0.001})), 'key "HealthCheck.Timeout": 0.001'),
            (document(app(ConnectTimeout=0.009)), 'key "ConnectTimeout": 0.009'),
            (document(app(IdleTimeout=1e-9)), 'key "IdleTimeout": 1e-09'),
            (document(DrainTimeout=0.001), 'key "DrainTimeout": 0.001'),
        ]:
            self.assertRefused(content, key, "is outside the range", "10 ms to one week")

    def test_tooLong(self) -> None:
        self.assertRefused(
            document(app(IdleTimeout=604801)),
            'key "IdleTimeout": 604801 is outside the range 0 or 0.01-604800 seconds',
        )
        self.assertRefused(
            document(app(ConnectTimeout=1e7)),
            'key "ConnectTimeout": 10000000.0 is outside the range 0.01-604800 seconds',
        )
        self.assertRefused(
            document(app(BandwidthLimit=2e12)),
            'key "BandwidthLimit": 2000000000000.0 is more than the largest limit, 1e+12 bytes per second',
        )

    def test_bounds(self) -> None:
        """
        The ends of each range are accepted, and 0 where it means off.
        """
        config = loadConfig(
            self.writeConfig(
                document(
                    app(
                        ConnectTimeout=0.01,
                        IdleTimeout=0,
                        HealthCheck={"Interval": 0.01, "Timeout": 604800},
                        BandwidthLimit=1e12,
                    ),
                    DrainTimeout=0,
                )
            )
        )
        app0 = config.apps[0]
        self.assertEqual(
            (app0.connectTimeout, app0.idleTimeout, app0.healthCheck.interval, app0.bandwidthLimit),
            (0.01, 0.0, 0.01, 1e12),
        )
        self.assertEqual(config.drainTimeout, 0.0)


class NullTests(ConfigFileMixin, TestCase):
    """
    C{null} means "no limit" for the keys that can be off (MaxConnections,
    MaxConnectionsPerClient, BandwidthLimit, HealthCheck), and in an app it
    overrides a "Defaults" value; for every other key it is refused.
    """

    def test_offForLimits(self) -> None:
        config = loadConfig(
            self.writeConfig(
                document(
                    app(MaxConnections=None, BandwidthLimit=None),
                    Defaults={"MaxConnectionsPerClient": 5, "HealthCheck": {"Interval": 1}},
                    MaxConnections=None,
                )
            )
        )
        self.assertIsNone(config.maxConnections)
        self.assertEqual(config.apps[0].maxConnectionsPerClient, 5)
        overridden = loadConfig(
            self.writeConfig(
                '{"Defaults": {"MaxConnectionsPerClient": 5, "HealthCheck": {"Interval": 1},'
                ' "BandwidthLimit": 1000},'
                ' "Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"],'
                ' "MaxConnectionsPerClient": null, "HealthCheck": null, "BandwidthLimit": null}]}'
            )
        ).apps[0]
        self.assertEqual(
            (overridden.maxConnectionsPerClient, overridden.healthCheck, overridden.bandwidthLimit),
            (None, None, None),
        )

    def test_refusedElsewhere(self) -> None:
        prefix = '{"Apps": [{"Name": "web", "Ports": [1], "Targets": ["h:1"], '
        for text, fragment in [
            (prefix + '"TargetTLS": {"ServerName": null}}]}', 'key "TargetTLS.ServerName": null is not'),
            (prefix + '"ConnectTimeout": null}]}', 'key "ConnectTimeout": null is not'),
            (prefix + '"IdleTimeout": null}]}', 'key "IdleTimeout": null is not'),
            (prefix + '"AccessLog": null}]}', 'key "AccessLog": null is not'),
            (
                '{"DrainTimeout": null, "Apps": [{"Name": "w", "Ports": [1], "Targets": ["h:1"]}]}',
                'key "DrainTimeout": null is not',
            ),
        ]:
            self.assertRefused(text, fragment)


class ByteOrderMarkTests(ConfigFileMixin, TestCase):
    def test_accepted(self) -> None:
        """
        A file saved with a UTF-8 byte-order mark (as some Windows editors
        do) is read as if it had none.
        """
        config = loadConfig(self.writeConfig(b"\xef\xbb\xbf" + json.dumps(document()).encode()))
        self.assertEqual(config.apps[0].name, "web")

    def test_badByteCountedFromTheFileStart(self) -> None:
        self.assertRefused(b'\xef\xbb\xbf{"Apps": [{"Name": "caf\xe9"}]}', "not UTF-8 text", "at byte 26")


class LinearTimeTests(ConfigFileMixin, TestCase):
    """
    Checking takes time linear in the size of the file, up to the largest
    lists a configuration can hold.

    Time is compared, not bounded: a list eight times longer must take less
    than L{GROWTH} times as long to check (linear: 8; the quadratic checks
    this guards against: 64), each the best of two runs, in this process's
    CPU time: other processes on a busy machine do not count, where a bound
    in seconds of wall time failed on it.
    """

    GROWTH = 24

    def checkingTime(self, content: object, refused: str | None) -> float:
        path = self.writeConfig(content)
        best = float("inf")
        for _ in range(2):
            started = time.process_time()
            if refused is None:
                loadConfig(path)
            else:
                self.assertRefusedFile(path, refused)
            best = min(best, time.process_time() - started)
        return best

    def assertLinear(self, make, refused: str | None = None) -> None:
        """
        C{make(n)} is a document with a list of C{n}: checking one of
        C{8 * n} takes less than L{GROWTH} times as long as one of C{n}.
        """
        small = self.checkingTime(make(self.N), refused)
        large = self.checkingTime(make(8 * self.N), refused)
        self.assertLess(large, self.GROWTH * max(small, 0.001), f"{small:.3f}s, then {large:.3f}s")

    N = 2500

    def test_everyPort(self) -> None:
        def ports(n: int) -> list[int]:
            # The large list is every port there is (65535).
            return list(range(1, n * 65535 // 20000 + 1))

        self.assertLinear(lambda n: document(app(Ports=ports(n))))
        self.assertLinear(lambda n: document(app(Ports=ports(n) + [1])), "1 is listed twice")

    def test_manyTargets(self) -> None:
        def targets(n: int) -> list[str]:
            return [f"10.{i // 65536}.{i // 256 % 256}.{i % 256}:80" for i in range(n)]

        self.assertLinear(lambda n: document(app(Targets=targets(n))))
        self.assertLinear(lambda n: document(app(Targets=targets(n) + targets(1))), "is listed twice")

    def test_manyApps(self) -> None:
        def apps(n: int) -> list:
            return [app(f"app{i}", Ports=[i + 1], Targets=[f"127.0.0.1:{i + 1}"]) for i in range(n)]

        self.assertLinear(lambda n: document(*apps(n)))
        twice = "is the name of another app too"
        self.assertLinear(lambda n: document(*apps(n), app("app0", Ports=[30000])), twice)


class AdminConfigTests(ConfigFileMixin, TestCase):
    """
    The top-level C{"Admin"} key: off without it, C{Listen} an IP address
    and port, C{Allow} networks (loopback by default).
    """

    def test_offByDefault(self) -> None:
        self.assertIsNone(loadConfig(self.writeConfig(document())).admin)
        self.assertIsNone(loadConfig(self.writeConfig(document(Admin=None))).admin)

    def test_listen(self) -> None:
        admin = loadConfig(self.writeConfig(document(Admin={"Listen": "127.0.0.1:9901"}))).admin
        self.assertEqual((admin.host, admin.port, admin.allowGiven), ("127.0.0.1", 9901, False))
        self.assertEqual([str(n) for n in admin.allow], ["127.0.0.0/8", "::1/128"])
        self.assertTrue(admin.loopback)
        admin = loadConfig(
            self.writeConfig(document(Admin={"Listen": "[::1]:9901", "Allow": ["10.0.0.0/8"]}))
        ).admin
        self.assertEqual((admin.host, str(admin), admin.allowGiven), ("::1", "[::1]:9901", True))
        self.assertEqual([str(n) for n in admin.allow], ["10.0.0.0/8"])
        admin = loadConfig(self.writeConfig(document(Admin={"Listen": "0.0.0.0:9901"}))).admin
        self.assertFalse(admin.loopback)

    def test_refused(self) -> None:
        for value, fragment in [
            (
                {"Listen": "localhost:9901"},
                'key "Admin.Listen": "localhost:9901" is not an IP address and port',
            ),
            ({"Listen": "127.0.0.1"}, 'key "Admin.Listen": "127.0.0.1" is not an IP address and port'),
            ({"Listen": 9901}, 'key "Admin.Listen": 9901 is not an IP address and port'),
            ({"Listen": "127.0.0.1:0"}, 'key "Admin.Listen": "127.0.0.1:0"'),
            ({}, 'key "Admin.Listen": missing required key'),
            (
                {"Listen": "127.0.0.1:9901", "Alow": []},
                'key "Admin.Alow": unknown key (did you mean "Allow"?)',
            ),
            (
                {"Listen": "127.0.0.1:9901", "Allow": []},
                'key "Admin.Allow": [] lets no client in (leave Allow out for loopback only',
            ),
            (
                {"Listen": "127.0.0.1:9901", "Allow": ["nope"]},
                'key "Admin.Allow": "nope" is not an IPv4 or IPv6',
            ),
            (
                "127.0.0.1:9901",
                'key "Admin": "127.0.0.1:9901" is not an object of admin endpoint settings, '
                'like {"Listen": "127.0.0.1:9901"}',
            ),
        ]:
            self.assertRefused(document(Admin=value), fragment)


class BalanceConfigTests(TestCase):
    """
    C{"Balance"}, C{"QueueTimeout"}, C{"SlowStart"}, and a target's
    C{"Weight"}, C{"MaxConnections"} and C{"Backup"} (issue 15).
    """

    def refused(self, **keys) -> str:
        from tcpproxy.config import ConfigError

        error = self.assertRaises(ConfigError, parseConfig, document(app(**keys)), "c.json")
        return str(error)

    def test_accepted(self) -> None:
        [web] = parseConfig(
            document(
                app(
                    Targets=[
                        "127.0.0.1:1",
                        {"Address": "127.0.0.1:2", "Weight": 3, "MaxConnections": 10, "Backup": True},
                        {"Address": "127.0.0.1:3", "Weight": 0},
                    ],
                    Balance="least-connections",
                    QueueTimeout=2.5,
                    SlowStart=30,
                )
            )
        ).apps
        self.assertEqual((web.balance, web.queueTimeout, web.slowStart), ("least-connections", 2.5, 30.0))
        self.assertEqual(
            [(t.port, t.weight, t.maxConnections, t.backup) for t in web.targets],
            [(1, 1, None, False), (2, 3, 10, True), (3, 0, None, False)],
        )
        self.assertEqual(web.targetSettings, ((1, None, False), (3, 10, True), (0, None, False)))

    def test_defaults(self) -> None:
        """
        The policy and the queue's timeout may be given for every app.
        """
        config = parseConfig(
            document(
                app("a", Ports=[1]),
                app("b", Ports=[2], Balance="random"),
                Defaults={"Balance": "source-hash"},
            )
        )
        self.assertEqual([a.balance for a in config.apps], ["source-hash", "random"])
        self.assertEqual(parseConfig(document()).apps[0].balance, "round-robin")

    def test_sameAddressEqual(self) -> None:
        """
        A target is its address: with another weight it is the same target
        (its health and counts carry over a reload), and the app differs.
        """
        one = parseConfig(document(app(Targets=[{"Address": "127.0.0.1:1", "Weight": 1}]))).apps[0]
        two = parseConfig(document(app(Targets=[{"Address": "127.0.0.1:1", "Weight": 2}]))).apps[0]
        self.assertEqual(one.targets, two.targets)
        self.assertNotEqual(one, two)

    def test_refusals(self) -> None:
        for keys, expected in (
            (
                {"Balance": "leastconn"},
                'c.json: app "web": key "Balance": "leastconn" is not a balancing policy '
                '(did you mean "least-connections"?); use one of round-robin, least-connections, '
                "power-of-two, source-hash, random",
            ),
            ({"Balance": 1}, 'key "Balance": 1 is not a balancing policy'),
            ({"QueueTimeout": -1}, 'key "QueueTimeout": -1 must be 0 or more seconds'),
            ({"SlowStart": "5"}, 'key "SlowStart": "5" is not a number of seconds'),
            (
                {"Targets": [{"Address": "127.0.0.1:1", "Weight": 257}]},
                'key "Targets[1].Weight": 257 is not a whole number from 0 (no new clients) to 256',
            ),
            ({"Targets": [{"Address": "127.0.0.1:1", "Weight": 1.5}]}, 'key "Targets[1].Weight": 1.5'),
            (
                {"Targets": ["127.0.0.1:2", {"Address": "127.0.0.1:1", "MaxConnections": 0}]},
                'key "Targets[2].MaxConnections": 0 is not a whole number of 1 or more',
            ),
            (
                {"Targets": [{"Address": "127.0.0.1:1", "Backup": 1}]},
                'key "Targets[1].Backup": 1 is not true or false',
            ),
            (
                {"Targets": [{"Address": "127.0.0.1:1", "Backup": True}]},
                'key "Targets": lists only backup targets; at least one must not be a backup',
            ),
            (
                {"Targets": [{"Address": "127.0.0.1:1", "Wieght": 2}]},
                'key "Targets[1].Wieght": unknown key (did you mean "Weight"?)',
            ),
        ):
            self.assertIn(expected, self.refused(**keys), keys)
