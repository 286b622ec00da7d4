"""System tests: they run the real C{twistd tcpproxy} process."""
