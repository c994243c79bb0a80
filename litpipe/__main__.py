"""`python -m litpipe`: the `litpipe` command."""

from litpipe.cli import entry

if __name__ == "__main__":
    entry()
