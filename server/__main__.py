"""``python -m micrograd.server serve ...``: the same as the ``micrograd-rpc`` command."""

from .cli import main

raise SystemExit(main())
