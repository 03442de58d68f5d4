"""`python -m driftscope ...`: the `driftscope` command."""
from driftscope.cli import command

if __name__ == "__main__":
    command()
