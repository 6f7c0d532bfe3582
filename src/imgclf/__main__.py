"""``python -m imgclf`` (what torchrun launches)."""

import sys

from imgclf.cli import main

sys.exit(main())
