"""
C{python -m bench}: see L{bench.cli}.
"""

import sys

from bench.cli import main

sys.exit(main())
