"""``python -m dam_compile.cli``: the ``dam-compile`` command."""

from .main import main

raise SystemExit(main())
