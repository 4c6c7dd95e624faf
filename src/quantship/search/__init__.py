"""Mixed precision: choose a scheme per layer group under a bits budget or a quality budget.

sensitivity.py  layer groups, the float reference on calibration text, per group x rung loss
                (measured KLD, or a Fisher proxy validated against it)
assign.py       the multiple-choice knapsack: least predicted loss under a bits budget, or fewest
                bits whose predicted loss holds a limit (exact DP over the bit budget)
loop.py         quantize the chosen mix, measure it, promote the worst groups, repeat
"""

from .assign import Assignment, brute_force, solve_max_bits, solve_min_bits
from .loop import SearchResult, SearchSpec, run_search

__all__ = ["Assignment", "SearchResult", "SearchSpec", "brute_force", "run_search", "solve_max_bits",
           "solve_min_bits"]
