"""
Tests for the C{tcpproxy-tester} command line (L{tcpproxy.tester.script}) and
the small pieces it puts together: ports, messages, the progress line.
"""

from __future__ import annotations

import io
import json

from twisted.internet import reactor
from twisted.internet.defer import ensureDeferred
from twisted.trial.unittest import SynchronousTestCase, TestCase

from tcpproxy.config import parseConfig
from tcpproxy.tester import load, payloads
from tcpproxy.tester.progress import ProgressLine
from tcpproxy.tester.script import LoadOptions, UserError, planLoad, run, runLoad
from tcpproxy.tester.stats import Recorder
from tcpproxy.tester.targets import SelectionError, selectPorts
from tcpproxy.tester.testing import InProcessProxy, freePorts

try:
    import matplotlib  # noqa: F401
except ImportError:
    NO_MATPLOTLIB: str | None = "matplotlib is not installed (pip install 'tcpproxy[plot]')"
else:
    NO_MATPLOTLIB = None

CONFIG = {
    "BindAddress": "0.0.0.0",
    "Apps": [
        {"Name": "five-thousand", "Ports": [5001, 5200], "Targets": ["127.0.0.1:6001"]},
        {"Name": "six-thousand", "Ports": [6100], "Targets": ["127.0.0.1:7001"]},
    ],
}


def writeConfig(testCase, document=CONFIG) -> str:
    path = testCase.mktemp()
    with open(path, "w") as f:
        json.dump(document, f)
    return path


class CommandLineMistakeTests(SynchronousTestCase):
    """
    A user's mistake gets one clear message and exit status 2, no traceback.
    """

    def runTester(self, *argv: str) -> tuple[int, str, str]:
        out, err = io.StringIO(), io.StringIO()
        reacted = []
        status = run(list(argv), out, err, react=lambda *args: reacted.append(args) or 0)
        self.assertNotIn("Traceback", err.getvalue())
        self.reacted = reacted
        return status, out.getvalue(), err.getvalue()

    def assertRefused(self, argv: list[str], message: str) -> None:
        status, out, err = self.runTester(*argv)
        self.assertEqual(status, 2, err)
        self.assertTrue(err.startswith("tcpproxy-tester: error: "), err)
        self.assertIn(message, err)
        self.assertEqual(self.reacted, [])

    def test_missingConfig(self) -> None:
        for command in ("load", "check"):
            self.assertRefused(
                [command, "--config", "nowhere.json"],
                "nowhere.json: cannot read the configuration file: No such file or directory",
            )

    def test_badConfig(self) -> None:
        path = writeConfig(self, {"Apps": []})
        self.assertRefused(["load", "--config", path], 'key "Apps": is empty')

    def test_unknownApp(self) -> None:
        path = writeConfig(self)
        self.assertRefused(
            ["check", "--config", path, "--app", "five-thousands"],
            f'--app "five-thousands": no such app in {path} (did you mean "five-thousand"?); '
            "its apps are five-thousand, six-thousand",
        )

    def test_unknownPort(self) -> None:
        path = writeConfig(self)
        self.assertRefused(
            ["load", "--config", path, "--port", "7100"], f"--port 7100: no app in {path} listens on it"
        )
        self.assertRefused(
            ["load", "--config", path, "--app", "six-thousand", "--port", "5001"],
            '--port 5001: it belongs to app "five-thousand", which --app left out',
        )

    def test_options(self) -> None:
        """
        Options that are malformed or do not go together are refused, naming them.
        """
        cases = [
            (["load", "--connections", "0"], "--connections '0': give a whole number, 1 or more"),
            (["load", "--rate", "fast"], "--rate 'fast': give a number, greater than 0"),
            (["load", "--port", "http"], "--port 'http': give a port number, 1-65535"),
            (["load", "--message", "a", "--size", "3"], "--message and --size cannot be used together"),
            (["load", "--rate", "5", "--shape", "sine"], "--rate (per connection) and --shape/--max-rate"),
            (["load", "--shape", "sine"], "--shape sine needs --max-rate"),
            (["load", "--shape", "square", "--max-rate", "5"], "--shape 'square': shapes are constant, step"),
            (["load", "--step", "5"], "--step and --step-every only make sense with --shape step"),
            (["load", "--burst", "5"], "--burst only makes sense in an open loop"),
            (["load", "--end", "later"], "--end 'later': say drain or cut"),
            (["load", "--sweep", "1,,3"], "--sweep '1,,3': give connection counts like 1,10,100"),
            (["frob"], "Unknown command: frob"),
            ([], "say check or load"),
        ]
        for argv, message in cases:
            self.assertRefused(argv, message)

    def test_badShape(self) -> None:
        path = writeConfig(self)
        self.assertRefused(
            ["load", "--config", path, "--shape", "sine", "--max-rate", "5", "--min-rate", "9"],
            "--min-rate 9 must be between 0 and --max-rate 5",
        )

    def test_messageFile(self) -> None:
        path = writeConfig(self)
        self.assertRefused(
            ["load", "--config", path, "--message-file", "nothing.txt"],
            "--message-file nothing.txt: cannot read it: No such file or directory",
        )
        empty = self.mktemp()
        with open(empty, "w") as f:
            f.write("\n\n")
        self.assertRefused(["load", "--config", path, "--message-file", empty], "has no line to send")

    def test_plan(self) -> None:
        """
        A good command line is planned (ports, messages) before the reactor runs.
        """
        path = writeConfig(self)
        status, _, err = self.runTester("load", "--config", path, "--app", "five-thousand", "--message", "hi")
        self.assertEqual(status, 0, err)
        [(options, plan, _, _)] = self.reacted
        self.assertEqual(
            [(p.app, p.port, str(p.target)) for p in plan.ports],
            [
                ("five-thousand", 5001, "127.0.0.1:5001"),
                ("five-thousand", 5200, "127.0.0.1:5200"),
            ],
        )
        self.assertEqual(plan.payloads.messages, (b"hi",))
        self.assertIsNone(plan.shape)
        self.assertEqual(options["duration"], 10.0)


class LoadCommandTests(TestCase):
    """
    C{load} from options to tables, files and exit status, against a proxy
    in this process.
    """

    timeout = 30

    def setUp(self) -> None:
        self.proxy = InProcessProxy(reactor, [("alpha", 1, 1), ("beta", 1, 1)])
        self.proxy.start()
        self.addCleanup(self.proxy.stop)
        self.config = self.mktemp()
        self.dead = freePorts(1)[0]
        self.proxy.writeConfig(
            self.config, [{"Name": "gone", "Ports": [self.dead], "Targets": ["127.0.0.1:1"]}]
        )

    async def loadCommand(self, *argv: str) -> tuple[int, str, str]:
        options = LoadOptions()
        options.parseOptions(["--config", self.config, *argv])
        out, err = io.StringIO(), io.StringIO()
        status = await runLoad(reactor, options, planLoad(options), out, err)
        return status, out.getvalue(), err.getvalue()

    async def test_sweep(self) -> None:
        """
        A sweep prints a table per step and a summary, and writes the report
        and the plot.
        """
        report, plot = self.mktemp(), self.mktemp() + ".png"
        status, out, err = await self.loadCommand(
            "--app", "alpha", "--app", "beta", "--messages", "10", "--sweep", "1,3",
            "--report", report, "--plot", plot, "--quiet",
        )  # fmt: skip
        self.assertEqual(status, 0, err)
        self.assertIn("== 1 connection(s) per port ==\n", out)
        self.assertIn("== 3 connection(s) per port ==\n", out)
        summary = out.split("== sweep ==\n")[1].splitlines()
        self.assertEqual(
            [line.split()[:5] for line in summary[1:3]],
            [["1", "2", "20", "0", "0"], ["3", "6", "60", "0", "0"]],
        )
        with open(report) as f:
            document = json.load(f)
        self.assertEqual([r["total"]["answered"] for r in document["runs"]], [20, 60])
        self.assertEqual(document["settings"]["sweep"], [1, 3])
        with open(plot, "rb") as f:
            self.assertEqual(f.read(4), b"\x89PNG")
        self.assertEqual(err, "")

    test_sweep.skip = NO_MATPLOTLIB

    async def test_maxErrors(self) -> None:
        """
        Errors beyond C{--max-errors} make the exit status 1; the table names
        the port at fault.
        """
        status, out, err = await self.loadCommand("--messages", "3", "--connections", "2", "--quiet")
        self.assertEqual(status, 1)
        self.assertIn(f'  app "gone" port {self.dead}: 2 x cannot connect: connection refused', out)
        self.assertEqual(
            err, "tcpproxy-tester: 2 error(s) and 0 dropped message(s), more than --max-errors 0 allows\n"
        )
        status, out, err = await self.loadCommand(
            "--messages", "3", "--connections", "2", "--quiet", "--max-errors", "2"
        )
        self.assertEqual((status, err), (0, ""))

    async def test_progress(self) -> None:
        """
        Without C{--quiet}, a progress line per second (a tenth of one here)
        goes to standard error.
        """
        self.patch(load, "SAMPLE_INTERVAL", 0.1)
        status, out, err = await self.loadCommand("--app", "alpha", "--duration", "0.25", "--rate", "100")
        self.assertEqual(status, 0)
        lines = err.splitlines()
        self.assertEqual(len(lines), 2, err)
        self.assertRegex(lines[0], r"^ +0\.1s +\d+\.\d req/s  0 errors  0 dropped  1 conns  p99 \d+ us$")
        self.assertRegex(lines[1], r"^ +0\.2s ")

    async def test_unreachable(self) -> None:
        options = LoadOptions()
        options.parseOptions(["--config", self.config, "--app", "gone", "--messages", "1"])
        running = ensureDeferred(runLoad(reactor, options, planLoad(options), io.StringIO(), io.StringIO()))
        error = await self.assertFailure(running, UserError)
        self.assertEqual(error.status, 1)
        self.assertEqual(
            str(error),
            "could not connect to any port:\n"
            f'  app "gone" port {self.dead} (127.0.0.1:{self.dead}): connection refused\n'
            f"Is the proxy running?  (twistd -n tcpproxy --config {self.config})",
        )


class SelectPortsTests(SynchronousTestCase):
    def test_wildcard(self) -> None:
        """
        A proxy bound to every address is reached on loopback.
        """
        config = parseConfig(CONFIG)
        self.assertEqual(
            [str(p.target) for p in selectPorts(config)],
            ["127.0.0.1:5001", "127.0.0.1:5200", "127.0.0.1:6100"],
        )
        six = parseConfig(dict(CONFIG, BindAddress="::"))
        self.assertEqual(str(selectPorts(six, ports=(6100,))[0].target), "[::1]:6100")

    def test_host(self) -> None:
        config = parseConfig(CONFIG)
        [port] = selectPorts(config, apps=("six-thousand",), host="localhost")
        self.assertEqual((port.app, port.port, str(port.target)), ("six-thousand", 6100, "localhost:6100"))
        error = self.assertRaises(SelectionError, selectPorts, config, host="no such host")
        self.assertIn("--host 'no such host'", str(error))


class PayloadsTests(SynchronousTestCase):
    def test_file(self) -> None:
        """
        Each line of the file is a message, newline included, sent in turn.
        """
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"one\r\ntwo\n\nthree")
        messages = payloads.fromFile(path)
        cursor = messages.cursor()
        self.assertEqual([cursor() for _ in range(4)], [b"one\r\n", b"two\n", b"three", b"one\r\n"])
        self.assertEqual(messages.cursor()(), b"one\r\n")

    def test_size(self) -> None:
        messages = payloads.fromSize(100)
        self.assertEqual({len(m) for m in messages.messages}, {100})
        self.assertEqual(len(set(messages.messages)), len(messages.messages))
        self.assertGreater(len(messages.messages), 1)

    def test_text(self) -> None:
        self.assertEqual(payloads.fromText("héllo").messages, ("héllo".encode(),))
        self.assertRaises(payloads.PayloadError, payloads.fromText, "")


class ProgressLineTests(SynchronousTestCase):
    def sample(self, t: float):
        recorder = Recorder(["a"])
        recorder.sent("a", 3)
        recorder.answered("a", 0.0005, 10)
        recorder.error("a", 1, "x")
        return recorder.rollOver(t, 1.0, 4, None)

    def test_pipe(self) -> None:
        """
        Elsewhere than on a terminal, each second gets a line; errors add up.
        """
        stream = io.StringIO()
        progress = ProgressLine(stream, interactive=False)
        progress(self.sample(1.0))
        progress(self.sample(2.0))
        progress.finish()
        self.assertEqual(
            stream.getvalue().splitlines(),
            [
                "    1.0s         1.0 req/s  1 errors  0 dropped  4 conns  p99 500 us",
                "    2.0s         1.0 req/s  2 errors  0 dropped  4 conns  p99 500 us",
            ],
        )

    def test_terminal(self) -> None:
        """
        On a terminal the line is redrawn in place, and ended at the finish.
        """
        stream = io.StringIO()
        progress = ProgressLine(stream, interactive=True)
        progress(self.sample(1.0))
        progress(self.sample(2.0))
        progress.finish()
        text = stream.getvalue()
        self.assertEqual(text.count("\r"), 2)
        self.assertEqual(text.count("\n"), 1)
        self.assertTrue(text.endswith("p99 500 us\n"))
