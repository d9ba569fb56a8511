"""Per-pair differences of this sitting (output.txt): each round of one build against the same
round of the other. Five pairs: no interval, each pair's difference is printed."""
import re
import statistics as st

rows = {}
tag = None
for line in open('output.txt'):
    m = re.match(r'== (\S+) (\d+)', line)
    if m:
        tag = (m.group(1), int(m.group(2)))
        rows[tag] = {}
    m = re.search(r'the last after ([\d.]+) s; per device \(drop to WELCOME\) p50 (\d+) ms, p99 (\d+)', line)
    if m:
        rows[tag].update(back=float(m.group(1)), p50=int(m.group(2)), p99=int(m.group(3)))
    m = re.search(r'proxy ([\d.]+) s \[.*gateways ([\d.]+) s \[[\d.]+\] ([\d.]+)k.*fleet ([\d.]+) s \[', line)
    if m:
        rows[tag].update(proxy=float(m.group(1)), gw=float(m.group(2)), gwcs=float(m.group(3)),
                         fleet=float(m.group(4)))

for a, b in [('lanes', 'noworkers'), ('lanes-gw1', 'noworkers-gw1'),
             ('lanes-gw1', 'lanes'), ('noworkers-gw1', 'noworkers')]:
    P = [(rows[(a, i)], rows[(b, i)]) for (t, i) in rows if t == a and (b, i) in rows]
    print(f'## {a} against {b}, {len(P)} paired rounds')
    for k in ['back', 'p50', 'p99', 'proxy', 'gw', 'gwcs', 'fleet']:
        A = [x[k] for x, _ in P]
        B = [y[k] for _, y in P]
        D = [x[k] - y[k] for x, y in P]
        print(f'{k:6} {a}: median {st.median(A):.2f} | {b}: median {st.median(B):.2f} | '
              f'pairs ' + ', '.join(f'{d:+.2f}' for d in D) + f' (median {st.median(D):+.2f})')
