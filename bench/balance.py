"""
What choosing a target costs: the connection rate of one tcpproxy process
through three apps alike but for their C{"Balance"} (round-robin,
least-connections, source-hash; power-of-two and random with
C{--all}), each over the same three targets (three ports of one backend
process, so that where a client goes changes nothing else), measured in
the same run.

    python -m bench.balance [--repeat 6] [--window 2] [--concurrency 20] [--all]

Each repetition measures every policy once, one right after the other, in
an order that turns by one place from one repetition to the next (so that
the drift of a busy machine falls on each policy alike); the figure
reported for a policy is the median, over repetitions, of its rate divided
by round-robin's in the same repetition, with the proxy's CPU time per
connection likewise.  The proxy is pinned to the first CPU, the backends
and the load generator to the others (as C{python -m bench} does).

Every client connects from 127.0.0.1, so C{source-hash} sends them all to
one target: the hash is computed for each all the same, which is what is
measured; C{round-robin-one}, round-robin with every client on one target
too (the two others weigh 0), is the control for what that concentration
costs by itself (fewer events handled per wake-up of the proxy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

from bench import load
from bench.backends import BackendProcess, waitUntilEchoing
from bench.proxies import _twistd, freePort
from bench.system import checkoutEnvironment, childSetup, planCpus, processCpuSeconds, raiseFileLimit

LOOPBACK = "127.0.0.1"
POLICIES = ("round-robin", "least-connections", "source-hash", ONE_TARGET := "round-robin-one")
MORE_POLICIES = ("power-of-two", "random")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.balance", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeat", type=int, default=6, help="repetitions (default 6)")
    parser.add_argument("--window", type=float, default=2.0, help="seconds measured per policy (default 2)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds of warm-up first (default 0.5)")
    parser.add_argument("--concurrency", type=int, default=20, help="connections at a time (default 20)")
    parser.add_argument("--all", action="store_true", help="power-of-two and random as well")
    options = parser.parse_args(argv)
    policies = POLICIES + (MORE_POLICIES if options.all else ())
    raiseFileLimit()
    plan = planCpus()
    print(f"pinning: {plan.description}")
    # One backend process behind three ports: whichever target a policy
    # picks, the same loop answers, so that only the choosing differs.
    backend = BackendProcess(plan.load, ports=3)
    proxy = None
    workdir = tempfile.mkdtemp(prefix="bench-balance-")
    try:
        backend.start()
        targets = [f"{host}:{port}" for host, port in backend.addresses]
        # The control: round-robin with every client on one target (the
        # others weigh 0), as source-hash sends them all from 127.0.0.1.
        oneTarget = [targets[0], *({"Address": t, "Weight": 0} for t in targets[1:])]
        ports = {policy: freePort() for policy in policies}
        config = {
            "BindAddress": LOOPBACK,
            "Apps": [
                {
                    "Name": policy,
                    "Ports": [ports[policy]],
                    "Targets": targets if policy != ONE_TARGET else oneTarget,
                    "AccessLog": False,
                    "Balance": policy if policy != ONE_TARGET else "round-robin",
                }
                for policy in policies
            ],
        }
        path = os.path.join(workdir, "config.json")
        with open(path, "w") as f:
            json.dump(config, f)
        log = open(os.path.join(workdir, "twistd.log"), "w")
        proxy = subprocess.Popen(
            _twistd("-n", "--pidfile=", "tcpproxy", "--config", path),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=checkoutEnvironment(),
            cwd=workdir,
            preexec_fn=childSetup(plan.proxy),
            start_new_session=True,
        )
        for policy in policies:
            waitUntilEchoing((LOOPBACK, ports[policy]), 30, lambda: proxy.poll() is None)
        print(
            f"one tcpproxy process (pid {proxy.pid}), {len(policies)} apps"
            " over the same 3 targets (one backend process)"
        )
        rates: dict[str, list[float]] = {p: [] for p in policies}
        cpu: dict[str, list[float]] = {p: [] for p in policies}
        for rep in range(options.repeat):
            order = policies[rep % len(policies) :] + policies[: rep % len(policies)]
            for policy in order:
                before = processCpuSeconds(proxy.pid)
                figures = load.connectionRate(
                    (LOOPBACK, ports[policy]), options.concurrency, options.warmup, options.window
                )
                used = processCpuSeconds(proxy.pid) - before
                rates[policy].append(figures["conn/s"])
                cpu[policy].append(used * 1e6 / figures["connections"])
                if figures["errors"]:
                    print(f"  {policy}: {figures['errors']} errors: {figures['errorKinds']}")
            print(
                f"repetition {rep + 1}: "
                + ", ".join(f"{p} {rates[p][-1]:.0f} conn/s ({cpu[p][-1]:.0f} µs CPU/conn)" for p in policies)
            )
        print()
        print(f"{'policy':<20}{'conn/s (median)':>16}{'ratio to round-robin':>24}{'CPU µs/conn ratio':>20}")
        worst = 1.0
        for policy in policies:
            ratio = statistics.median(r / b for r, b in zip(rates[policy], rates["round-robin"], strict=True))
            cpuRatio = statistics.median(c / b for c, b in zip(cpu[policy], cpu["round-robin"], strict=True))
            if policy != "round-robin":
                worst = min(worst, ratio)
            print(f"{policy:<20}{statistics.median(rates[policy]):>16.0f}{ratio:>24.3f}{cpuRatio:>20.3f}")
        print()
        print(f"lowest ratio to round-robin: {worst:.3f} ({'within' if worst >= 0.95 else 'NOT within'} 5%)")
        return 0
    finally:
        if proxy is not None and proxy.poll() is None:
            proxy.terminate()
            try:
                proxy.wait(10)
            except subprocess.TimeoutExpired:
                proxy.kill()
        backend.stop()


if __name__ == "__main__":
    sys.exit(main())
