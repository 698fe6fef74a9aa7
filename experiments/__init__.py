"""The laboratory that tests the method: each module runs as `python -m experiments.NAME`."""
import sys


def cli(main, name):
    """Runs a command's main() (an int it returns is the exit status): bad settings or files end in
    their message, not a traceback."""
    try:
        status = main()
        sys.exit(status if isinstance(status, int) else 0)
    except (ValueError, OSError) as err:
        sys.exit(f"experiments.{name}: {err}")
