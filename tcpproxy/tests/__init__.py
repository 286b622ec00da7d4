"""Unit and loopback integration tests for tcpproxy (run with C{trial tcpproxy.tests})."""
