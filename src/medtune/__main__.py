"""`python -m medtune ...` behaves exactly like the `medtune` console script (torchrun needs this form)."""

from medtune.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
