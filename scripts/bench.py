#!/usr/bin/env python
"""The step benchmark is `bigbatch bench` (bigbatch.bench); this runs it with the same flags.

    python scripts/bench.py --help
"""

import sys

from bigbatch.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
