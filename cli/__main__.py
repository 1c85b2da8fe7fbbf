"""``python -m cli``: the ``badexpert`` command."""

import sys

from cli.main import main

sys.exit(main())
