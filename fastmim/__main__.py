"""``python -m fastmim`` is the ``fastmim`` command."""

from fastmim.cli import main

raise SystemExit(main())
