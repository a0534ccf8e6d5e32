"""``python -m xseqloss``: the same command line as the ``xseqloss`` console script."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
