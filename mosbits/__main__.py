"""``python -m mosbits``: the same as the ``mosbits`` command."""

from mosbits.cli import main

raise SystemExit(main())
