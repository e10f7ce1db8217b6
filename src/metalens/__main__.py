"""``python -m metalens``: the same as the ``metalens`` command."""

import sys

from metalens.cli import main

sys.exit(main())
