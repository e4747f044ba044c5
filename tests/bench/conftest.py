"""``bench/`` on the import path, so the test modules import its scripts (``import e2e``) the way the
scripts import each other."""

import sys

from tests.bench import BENCH

sys.path.insert(0, str(BENCH))
