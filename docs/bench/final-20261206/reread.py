"""Re-renders a peer_bench JSON with the current render: `python3 docs/bench/final-20261206/reread.py FILE.json`
(from the repository root; writes FILE-reread.md). Runs saved before `disagrees` existed get it
derived from their figures, as measure() now does (USER_HZ 100 assumed)."""
import json, sys, types
sys.path.insert(0, 'bench')
f = sys.argv[1]
sys.argv = ['x']
import peer_bench as pb
d = json.load(open(f))
rows = {}
for r in d['runs']:
    r = dict(r); sc = r.pop('scenario'); p = r.pop('proxy')
    # As measure() judges it, its tick gap from the per-unit figures and the run's work.
    ticks = 0 if r['own'] is None else (r['own'] - r['cost']) * d['rates'][sc] * d['args']['seconds'] * 100 / 1e6
    r['disagrees'] = r['own'] is not None and r['cost'] < r['own'] * (1 - pb.NOISE) and ticks > 5
    rows.setdefault((sc, p), []).append(r)
scen = list(dict.fromkeys(sc for sc, _ in rows))
proxies = list(dict.fromkeys(p for _, p in rows))
pb.cpu_model = lambda: d['cpu']
out = pb.render(rows, scen, proxies, types.SimpleNamespace(**d['args']), d['rates'])
open(f.replace('.json', '-reread.md'), 'w').write(out)
print(out)
