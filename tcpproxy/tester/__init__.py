"""
C{tcpproxy-tester}: prove a running proxy works, and measure it.

The tester reads the proxy's own configuration file and talks to every port
of every app in it:

  - C{check} (L{tcpproxy.tester.check}) is a conformance run built on trial:
    test cases generated from the configuration, run by trial's runner.
  - C{load} (L{tcpproxy.tester.load}) drives echo traffic at a chosen pace
    and reports throughput and latency percentiles from an HDR histogram.

Both run on the Twisted reactor, which is passed in wherever tests need to
control time.
"""
