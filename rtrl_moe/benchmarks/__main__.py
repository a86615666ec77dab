"""Entry point of ``python -m rtrl_moe.benchmarks``."""

import sys

from rtrl_moe.benchmarks.cli import main

sys.exit(main())
