"""``python -m pgproxy``."""

from pgproxy.cli import main

raise SystemExit(main())
