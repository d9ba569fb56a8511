#!/usr/bin/env python3
"""How often a 95% interval on a ratio of two proxies' costs contains the true ratio, when
both are the same proxy (true ratio 1.0) measured over a few interleaved rounds.

Model: each round shares a machine state (a factor common to the round's two runs, sd 10%),
each run adds its own noise (sd 10%), log-normal. Two intervals: the percentile bootstrap of
the ratio of means over rounds, and Student's t on the rounds' log ratios (what
peer_bench.py uses). Then a family: 15 such intervals (a self-comparison's 7 scenarios by two
measures, and memory), how often every one reads level with each at 95%, and with Holm's
step-down (peer_bench.py's family line); and what the family line costs: how often a real
difference in one of the 15 is seen, by its own interval and by the family.
Usage: python3 bench/interval_coverage.py [TRIALS]
"""

import math
import os
import random
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench  # noqa: E402


def bootstrap(a, b, rng, resamples=1000):
    n = len(a)
    ratios = []
    for _ in range(resamples):
        pick = [rng.randrange(n) for _ in range(n)]
        ratios.append(sum(a[i] for i in pick) / sum(b[i] for i in pick))
    ratios.sort()
    return ratios[int(0.025 * resamples)], ratios[int(0.975 * resamples) - 1]


def student(a, b):
    logs = [math.log(x / y) for x, y in zip(a, b)]
    half = peer_bench.T975[len(logs) - 2] * statistics.stdev(logs) / math.sqrt(len(logs))
    mean = statistics.mean(logs)
    return math.exp(mean - half), math.exp(mean + half)


def pair_p(rng, rounds, ratio=1.0):
    """The p-value peer_bench gives two proxies whose true cost ratio is `ratio`, measured over
    `rounds` rounds of the model above."""
    state = [100 * math.exp(rng.gauss(0, 0.1)) for _ in range(rounds)]
    runs_a = [dict(round=r, cost=ratio * s * math.exp(rng.gauss(0, 0.1)), noisy=False) for r, s in enumerate(state)]
    runs_b = [dict(round=r, cost=s * math.exp(rng.gauss(0, 0.1)), noisy=False) for r, s in enumerate(state)]
    return peer_bench.ratio_p_value(runs_a, runs_b, "cost")


def main():
    trials = int(sys.argv[1]) if len(sys.argv) > 1 else 1000
    rng = random.Random(7)
    print("rounds | percentile bootstrap covers 1.0 | Student's t on log ratios covers 1.0")
    for n in (3, 5, 10):
        boot = t = 0
        for _ in range(trials):
            a, b = [], []
            for _ in range(n):
                state = 100 * math.exp(rng.gauss(0, 0.1))
                a.append(state * math.exp(rng.gauss(0, 0.1)))
                b.append(state * math.exp(rng.gauss(0, 0.1)))
            lo, hi = bootstrap(a, b, rng)
            boot += lo <= 1.0 <= hi
            lo, hi = student(a, b)
            t += lo <= 1.0 <= hi
        print(f"{n:6} | {boot / trials:.3f} | {t / trials:.3f}")
    family = 15
    print(f"\n{family} intervals of one proxy against itself: how often every one reads level")
    print("rounds | each at 95% | Holm's step-down, family-wise 95%")
    for n in (5, 10):
        each = together = 0
        for _ in range(trials):
            ps = [pair_p(rng, n) for _ in range(family)]
            each += all(p >= 0.05 for p in ps)
            together += not any(out for _, out in peer_bench.holm(ps))
        print(f"{n:6} | {each / trials:.3f} | {together / trials:.3f}")
    print(f"\none of the {family} truly apart, the others level: how often it is seen apart")
    print("rounds | true ratio | by its own 95% interval | by the family (Holm)")
    for n in (5, 10):
        for true in (1.1, 1.2, 1.3):
            own = fam = 0
            for _ in range(trials):
                ps = [pair_p(rng, n, true if i == 0 else 1.0) for i in range(family)]
                own += ps[0] < 0.05
                fam += peer_bench.holm(ps)[0][1]
            print(f"{n:6} | {true:.1f} | {own / trials:.3f} | {fam / trials:.3f}")


if __name__ == "__main__":
    main()
