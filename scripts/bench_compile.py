#!/usr/bin/env python
"""--torchcompile's speed-up is bigbatch.bench.compile_speed; this runs it with the same flags.

    python scripts/bench_compile.py --help
"""

import sys

from bigbatch.bench.compile_speed import main

if __name__ == "__main__":
    main(sys.argv[1:])
