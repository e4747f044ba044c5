"""``python -m fusetune``: the ``fusetune`` command line."""

import sys

from fusetune.cli import main

sys.exit(main())
