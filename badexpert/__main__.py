"""``python -m badexpert``: the ``badexpert`` command."""

import sys

from badexpert.main import main

sys.exit(main())
