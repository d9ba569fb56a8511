"""Paired figures of the storm-split sittings: each round of one build against the same round
of the other, medians and a bootstrap 95% interval of the median paired difference."""
import random
import re
import statistics as st

FILES = ['first-output.txt', 'second-output.txt', 'third-output.txt',
         'gateway-link-workers-output.txt', 'gateway-one-thread-output.txt']
rows = {}
for f in FILES:
    tag = None
    for line in open(f):
        m = re.match(r'== (\S+) (\d+)', line)
        if m:
            tag = (f, m.group(1), int(m.group(2)))
            rows[tag] = {}
        m = re.search(r'the last after ([\d.]+) s; per device \(drop to WELCOME\) p50 (\d+) ms, p99 (\d+)', line)
        if m:
            rows[tag].update(back=float(m.group(1)), p50=int(m.group(2)), p99=int(m.group(3)))
        m = re.search(r'proxy ([\d.]+) s \[.*gateways ([\d.]+) s \[.*fleet ([\d.]+) s \[', line)
        if m:
            rows[tag].update(proxy=float(m.group(1)), gw=float(m.group(2)), fleet=float(m.group(3)))
        m = re.search(r'w-0 ([\d.]+) s.*w-1 ([\d.]+) s', line)
        if m:
            rows[tag].update(w0=float(m.group(1)), w1=float(m.group(2)))


def pairs(a, b, files):
    return [(r, rows[(f, b, i)]) for (f, t, i), r in rows.items()
            if f in files and t == a and (f, b, i) in rows]


def boot(d, n=10000):
    random.seed(1)
    ms = sorted(st.median(random.choices(d, k=len(d))) for _ in range(n))
    return ms[int(.025 * n)], ms[int(.975 * n)]


for r in rows.values():
    if 'proxy' in r:
        # Everyone's CPU over two cores: the storm's length on a saturated host, as bookkeeping.
        r['all/2'] = (r['proxy'] + r['gw'] + r['fleet']) / 2

for label, a, b, files in [('default gateways', 'lanes', 'noworkers', FILES[:4]),
                           ('gateway link runtimes (scratch), against no workers',
                            'lanes-gwlw', 'noworkers', FILES[3:4]),
                           ('gateway link runtimes (scratch), both builds with them',
                            'lanes-gwlw', 'noworkers-gwlw', FILES[3:4]),
                           ('one-thread gateways', 'lanes', 'noworkers', FILES[4:])]:
    P = pairs(a, b, files)
    print(f'## {label}: {a} against {b}, {len(P)} paired rounds')
    for k in ['back', 'p50', 'p99', 'proxy', 'gw', 'fleet', 'all/2']:
        A = [x[k] for x, _ in P]
        B = [y[k] for _, y in P]
        D = [x[k] - y[k] for x, y in P]
        if len(P) > 5:
            lo, hi = boot(D)
            spread = f'median {st.median(D):+.2f} [{lo:+.2f}, {hi:+.2f}], pairs {min(D):+.2f} to {max(D):+.2f}'
        else:  # too few pairs for an interval: each pair's difference
            spread = 'pairs ' + ', '.join(f'{d:+.2f}' for d in D)
        print(f'{k:6} {a}: {min(A):.2f}-{max(A):.2f} median {st.median(A):.2f} | {b}: {min(B):.2f}-{max(B):.2f} '
              f'median {st.median(B):.2f} | difference {spread}')
    if all('w0' in x for x, _ in P):
        print('w-0 minus w-1 (s):', sorted(round(x['w0'] - x['w1'], 2) for x, _ in P),
              '; w-0 share, median: %.3f' % st.median(x['w0'] / (x['w0'] + x['w1']) for x, _ in P))
