#!/usr/bin/env python3
"""How often a 95% interval on a ratio of two proxies' costs contains the true ratio, when
both are the same proxy (true ratio 1.0) measured over a few interleaved rounds.

Model: each round shares a machine state (a factor common to the round's two runs, sd 10%),
each run adds its own noise (sd 10%), log-normal. Two intervals: the percentile bootstrap of
the ratio of means over rounds, and Student's t on the rounds' log ratios (what
peer_bench.py uses). Usage: python3 bench/interval_coverage.py [TRIALS]
"""

import math
import random
import statistics
import sys

T975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


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
    mean, half = statistics.mean(logs), T975[len(logs) - 1] * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean - half), math.exp(mean + half)


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


if __name__ == "__main__":
    main()
