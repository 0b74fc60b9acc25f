"""``python -m semisparse`` (and ``torchrun ... -m semisparse train ...``): the command line."""

from semisparse.cli import main

if __name__ == "__main__":
    main()
