"""What a benchmark sends: prompt token ids cut from real text, output lengths, arrival times.

Prompts are windows of the news corpus (evaluation split) tokenized by the model's own
tokenizer, so the engine sees real token ids rather than random ones (which would only
matter for sampling and stop checks, but real text keeps runs comparable with peers that
take the same ids). Lengths are fixed, or uniform in [len x (1 - r), len x (1 + r)] as
`vllm bench serve --random-range-ratio` draws them. Arrivals are a Poisson process: gaps
drawn from an exponential distribution with mean 1 / rate, from a seeded generator.
"""

from __future__ import annotations

import math
import random


def sample_lengths(n: int, mean: int, range_ratio: float, rng: random.Random) -> list[int]:
    """n lengths: all `mean` when range_ratio is 0, else uniform integers in mean x [1 - r, 1 + r] (at least 1)."""
    if n < 1 or mean < 1:
        raise ValueError(f"need n >= 1 and mean >= 1, got n={n}, mean={mean}")
    if not 0 <= range_ratio < 1:
        raise ValueError(f"range_ratio must be in [0, 1), got {range_ratio}")
    if range_ratio == 0:
        return [mean] * n
    lo, hi = max(1, math.floor(mean * (1 - range_ratio))), math.ceil(mean * (1 + range_ratio))
    return [rng.randint(lo, hi) for _ in range(n)]


def poisson_arrivals(n: int, rate: float, seed: int) -> list[float]:
    """Arrival offsets (seconds from the start) of n requests at `rate` per second; the first arrives at 0."""
    if n < 1:
        raise ValueError(f"need at least one request, got {n}")
    if not rate > 0:
        raise ValueError(f"request rate must be > 0 per second, got {rate}")
    rng = random.Random(seed)
    times, t = [0.0], 0.0
    for _ in range(n - 1):
        t += rng.expovariate(rate)
        times.append(t)
    return times


def corpus_token_ids(tokenizer, corpus: str = "news", min_tokens: int = 8192) -> list[int]:
    """Token ids of the corpus's evaluation split, documents joined by blank lines; tokenizing stops
    once `min_tokens` are there (the whole corpus takes seconds with a slow tokenizer)."""
    from ..corpora import documents

    ids: list[int] = []
    for doc in documents(corpus, "eval"):
        ids += tokenizer(("\n\n" if ids else "") + doc, add_special_tokens=False)["input_ids"]
        if len(ids) >= min_tokens:
            break
    return ids


def corpus_prompts(token_ids: list[int], lengths: list[int], rng: random.Random) -> list[list[int]]:
    """One window of token_ids per length, each starting at a random offset (so requests differ)."""
    longest = max(lengths)
    if longest > len(token_ids):
        raise ValueError(f"a prompt of {longest} tokens is longer than the corpus ({len(token_ids)} tokens); "
                         f"lower --input-len")
    return [token_ids[start:start + n] for n in lengths
            for start in [rng.randint(0, len(token_ids) - n)]]
