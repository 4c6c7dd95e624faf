"""Deciding: error budgets (budget.py), the pure verdict (decide.py), the gate's measurements
(run.py), release ladders (release.py) and re-quantization checks (reproduce.py)."""

from .budget import Budget, BudgetError, load_budget, parse_budget
from .decide import Decision, Evidence, Term, decide

__all__ = ["Budget", "BudgetError", "Decision", "Evidence", "Term", "decide", "load_budget", "parse_budget"]
