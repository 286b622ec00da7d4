"""
System test: the local simulation of many nodes (C{examples/cluster/run.py})
as a user runs it: three real C{twistd tcpproxy} nodes on loopback
addresses, HAProxy in front checking their C{/ready} and sending PROXY v2,
targets from the script's own DNS server; a node killed under load, a DNS
change reaching every node.  Bounded in time.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

from twisted.trial.unittest import SkipTest, TestCase

from tests.support import childEnvironment

BOUND = 120
"""
Seconds the whole simulation may take (it takes about 15).
"""


class ClusterTests(TestCase):
    def test_simulation(self) -> None:
        if not (shutil.which("haproxy") or shutil.which("haproxy", path="/usr/sbin:/usr/local/sbin")):
            raise SkipTest("HAProxy is not installed (Debian: apt-get install haproxy; .ci/run installs it)")
        # The repository's example, next to this test (not an installed copy).
        script = os.path.join(
            os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "cluster", "run.py"
        )
        work = os.path.abspath(self.mktemp())
        done = subprocess.run(
            [sys.executable, script, "--dir", work, "--load-seconds", "2"],
            env=childEnvironment(),
            capture_output=True,
            text=True,
            timeout=BOUND,
        )
        if done.returncode == 2:
            raise SkipTest(done.stdout.strip())
        output = done.stdout + done.stderr
        self.assertEqual(done.returncode, 0, output)
        lines = output.splitlines()
        self.assertIn("   every node found its targets in DNS: a, b", lines)
        self.assertIn("== killed node 127.0.0.12 (SIGKILL) under load", lines)
        # After the kill, the two other nodes took the clients, and after
        # the DNS change, every node left has the new targets.
        for node in ("127.0.0.11", "127.0.0.13"):
            seen = [line for line in lines if line.startswith(f"   node {node}: targets b, c after")]
            self.assertEqual(len(seen), 1, output)
        self.assertEqual(lines[-1], "== OK", output)
