"""Mixed precision: choose a scheme per layer group under a bits budget or a quality budget.

sensitivity.py  layer groups, the float reference on calibration text, per group x rung loss
                (measured KLD, or a Fisher proxy validated against it)
assign.py       the multiple-choice knapsack: least predicted loss under a bits budget, or fewest
                bits whose predicted loss holds a limit (exact DP over the bit budget)
loop.py         quantize the chosen mix, measure it, promote the worst groups, repeat
"""

import importlib

_HOME = {"Assignment": "assign", "brute_force": "assign", "solve_max_bits": "assign", "solve_min_bits": "assign",
         "SearchResult": "loop", "run_search": "loop", "SearchSpec": "spec"}

__all__ = ["Assignment", "SearchResult", "SearchSpec", "brute_force", "run_search", "solve_max_bits",
           "solve_min_bits"]


def __getattr__(name: str):
    # the loop imports torch; the CLI's parser reads only the spec
    if name in _HOME:
        return getattr(importlib.import_module(f".{_HOME[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
