"""``python -m tfrun.cli``: the ``tfrun`` command."""

from tfrun.cli.main import console

if __name__ == "__main__":
    console()
