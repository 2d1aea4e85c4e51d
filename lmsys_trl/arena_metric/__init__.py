"""The arena preference metric as an `evaluate` module: `evaluate.load(lmsys_trl.arena_metric.PATH)`."""

import os


PATH = os.path.dirname(os.path.abspath(__file__))
