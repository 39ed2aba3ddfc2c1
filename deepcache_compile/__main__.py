"""`python -m deepcache_compile ...`: the command line of the evaluation tooling (`eval/cli.py`)."""

from .eval.cli import main

main()
