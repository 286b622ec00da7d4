"""
C{python -m tcpproxy.tester}: the same as the C{tcpproxy-tester} script.
"""

from tcpproxy.tester.script import main

if __name__ == "__main__":
    main()
