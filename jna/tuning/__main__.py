"""``python -m jna.tuning``: the autotuner's command line (`jna.tuning.tuner`)."""

import sys

from jna.tuning.tuner import main

sys.exit(main())
