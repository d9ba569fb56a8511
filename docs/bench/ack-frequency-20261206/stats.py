"""Per-round differences of this sitting's variants (run from this folder)."""
import re
import statistics as st

rows = {}
for r in range(1, 5):
    for v in ['lanes', 'lanes-ack', 'noworkers', 'noworkers-ack']:
        t = open(f'storm9k-tcp-link-r{r}-{v}-1.txt').read()
        m = re.search(r'the last after ([\d.]+) s; per device \(drop to WELCOME\) p50 (\d+) ms, p99 (\d+)', t)
        g = re.search(r'proxy ([\d.]+) s \[.*gateways ([\d.]+) s \[[\d.]+\] ([\d.]+)k', t)
        rows[(v, r)] = dict(back=float(m.group(1)), p50=int(m.group(2)), p99=int(m.group(3)),
                            proxy=float(g.group(1)), gw=float(g.group(2)), gwcs=float(g.group(3)),
                            ok='all checks passed' in t)
print('all checks passed in every run:', all(x['ok'] for x in rows.values()))
for a, b in [('lanes-ack', 'lanes'), ('noworkers-ack', 'noworkers'), ('lanes', 'noworkers'),
             ('lanes-ack', 'noworkers-ack')]:
    print(f'## {a} minus {b}, per round')
    for k in ['back', 'p50', 'p99', 'proxy', 'gw', 'gwcs']:
        D = [rows[(a, r)][k] - rows[(b, r)][k] for r in range(1, 5)]
        print(f'{k:6}', ', '.join(f'{d:+.2f}' for d in D),
              f'(median {st.median(D):+.2f}; {a} median {st.median(rows[(a, r)][k] for r in range(1, 5)):.2f})')
