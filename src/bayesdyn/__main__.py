"""``python -m bayesdyn`` (and ``torchrun ... -m bayesdyn``): the command line."""

from .cli import main

raise SystemExit(main())
