"""`python -m driftscope ...`: the `driftscope` command."""
import sys

from driftscope.cli import main

if __name__ == "__main__":
    sys.exit(main())
