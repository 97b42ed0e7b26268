"""`python -m dp.cli ...`, the same as the `dp` command (how tests and the benchmark start processors)."""

import sys

from dp.cli.main import main

sys.exit(main())
