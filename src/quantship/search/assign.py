"""Choose one rung per group: a multiple-choice knapsack over the groups' stored bits.

Inputs are per group g and rung r: `bits[g][r]` (the group's stored bits at that rung, an integer;
None where the rung cannot store the group, e.g. a group size that does not divide a layer) and
`loss[g][r]` (its predicted loss; the total is the sum over groups, the additive assumption).

solve_max_bits: the least total loss with total bits <= budget. Dynamic programming over the bit
    budget: all bit counts are divided by their greatest common divisor; when the budget is still
    more than `max_cells` units, bit counts are rounded UP to a coarser unit (the answer then always
    fits the budget and may leave a little of it unused: `exact` is False).
solve_min_bits: the fewest total bits whose predicted loss is <= a limit (the same DP table,
    read at its smallest capacity holding the limit).
brute_force: every assignment, for tests on tiny models.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Assignment:
    choice: tuple[int, ...]  # rung index per group
    bits: int  # total stored bits
    loss: float  # total predicted loss
    exact: bool = True  # False: bit counts were rounded up to a coarser unit


def _check(bits: list[list[int | None]], loss: list[list[float]]) -> None:
    if not bits:
        raise ValueError("no group to assign")
    for g, (b_row, l_row) in enumerate(zip(bits, loss, strict=True)):
        if len(b_row) != len(l_row):
            raise ValueError(f"group {g}: {len(b_row)} bit counts but {len(l_row)} losses")
        if all(b is None for b in b_row):
            raise ValueError(f"group {g}: no rung of the ladder can store it")


def total(bits, loss, choice) -> tuple[int, float]:
    return (sum(bits[g][r] for g, r in enumerate(choice)), float(sum(loss[g][r] for g, r in enumerate(choice))))


def min_bits(bits) -> int:
    return sum(min(b for b in row if b is not None) for row in bits)


def _dp(bits, loss, budget: int, max_cells: int):
    """-> (best (cap+1,) least loss with cost <= c, choices (G, cap+1) argmin rung, units per group x rung, exact)."""
    flat = [b for row in bits for b in row if b is not None]
    unit = math.gcd(*flat, budget) if budget > 0 else math.gcd(*flat)
    exact = True
    if budget // unit > max_cells:
        unit = unit * math.ceil(budget / unit / max_cells)
        exact = False
    cap = budget // unit
    units = [[None if b is None else -(-b // unit) for b in row] for row in bits]  # ceil: never over budget
    best = np.zeros(cap + 1)  # no group yet: loss 0 at every capacity
    choices = np.zeros((len(bits), cap + 1), dtype=np.int16)
    for g, row in enumerate(units):
        new = np.full(cap + 1, np.inf)
        for r, u in enumerate(row):
            if u is None or u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + loss[g][r]
            better = cand < new
            new[better] = cand[better]
            choices[g, better] = r
        best = new
    return best, choices, units, exact


def _backtrack(choices, units, c: int) -> tuple[int, ...]:
    picked = []
    for g in range(len(units) - 1, -1, -1):
        r = int(choices[g, c])
        picked.append(r)
        c -= units[g][r]
    return tuple(reversed(picked))


def solve_max_bits(bits, loss, budget: int, *, max_cells: int = 200_000) -> Assignment:
    """The assignment with the least total loss whose total bits are <= budget."""
    _check(bits, loss)
    floor = min_bits(bits)
    if budget < floor:
        raise ValueError(f"the bit budget {budget} is below the cheapest assignment ({floor} bits, every group "
                         f"at its cheapest rung)")
    best, choices, units, exact = _dp(bits, loss, budget, max_cells)
    c = int(np.argmin(best))  # least loss; ties: the fewest bits
    if not math.isfinite(best[c]):  # only when rounding up made the cheapest assignment not fit
        raise ValueError(f"the bit budget {budget} is too close to the cheapest assignment ({floor} bits) for the "
                         f"rounded DP; raise the budget slightly")
    choice = _backtrack(choices, units, c)
    b, l_ = total(bits, loss, choice)
    return Assignment(choice, b, l_, exact)


def solve_min_bits(bits, loss, max_loss: float, *, max_cells: int = 200_000) -> Assignment:
    """The assignment with the fewest bits whose total predicted loss is <= max_loss; if none is
    (the most precise rungs still predict more), the least-loss assignment."""
    _check(bits, loss)
    budget = sum(max(b for b in row if b is not None) for row in bits)
    best, choices, units, exact = _dp(bits, loss, budget, max_cells)
    holding = np.flatnonzero(best <= max_loss)
    c = int(holding[0]) if holding.size else int(np.argmin(best))
    choice = _backtrack(choices, units, c)
    b, l_ = total(bits, loss, choice)
    return Assignment(choice, b, l_, exact)


def brute_force(bits, loss, budget: int) -> Assignment:
    """Every assignment (tests): the least loss within budget, ties broken by fewer bits."""
    _check(bits, loss)
    best = None
    options = [[r for r, b in enumerate(row) if b is not None] for row in bits]
    for choice in itertools.product(*options):
        b, l_ = total(bits, loss, choice)
        if b <= budget and (best is None or (l_, b) < (best.loss, best.bits)):
            best = Assignment(tuple(choice), b, l_)
    if best is None:
        raise ValueError("no assignment fits the budget")
    return best
