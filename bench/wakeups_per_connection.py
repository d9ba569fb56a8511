#!/usr/bin/env python3
"""Wake-ups per connection: how often each proxy's threads blocked and were woken again
(their voluntary context switches, from /proc/PID/task/*/status) per connection made, under
peer_bench.py's own load (h2load, a connection per request, the proxy pinned to core 1). An
event loop blocks in epoll_wait when it has nothing to do, so this counts its wake-ups,
natively and without tracing: `perf trace` (syscalls_per_connection.py) and valgrind
(user_instructions.py) slow the proxy down and change how its events group into wake-ups.

Usage: python3 bench/wakeups_per_connection.py [--scenarios conn,tls] [--rates tls=50,...]
         [--seconds 5] [--rounds 3] [--proxies wasmbed,nginx] [--wasmbed BIN] [--compare BIN]
`--compare BIN` runs a second wasmbed binary as proxy `wasmbed-b`. Rounds are interleaved.
At a light rate every connection's events come alone; at the bench's rates a wake-up often
serves several connections.
"""
import argparse
import glob
import os
import signal
import statistics
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb  # noqa: E402
import syscalls_per_connection as spc  # noqa: E402


def switches(pids):
    """{thread name: voluntary context switches so far}, over every thread of `pids`."""
    out = {}
    for pid in pids:
        for path in glob.glob(f"/proc/{pid}/task/*/status"):
            try:
                fields = dict(line.split(":\t", 1) for line in open(path) if ":\t" in line)
            except OSError:
                continue  # a thread that ended meanwhile
            name = fields["Name"].strip()
            out[name] = out.get(name, 0) + int(fields["voluntary_ctxt_switches"])
    return out


def run(command, proxy, scenario, rate, seconds):
    """(connections, {thread: wake-ups}) of one run."""
    pb.wait_idle(pb.PROXY_CORE)
    running = pb.Running(proxy, command)
    try:
        before = switches(running.pids())
        ok, _p99, errors = pb.h2load(spc.URLS[scenario], rate * seconds, rate, True)
        after = switches(running.pids())
    finally:
        running.stop()
    if not ok:
        sys.exit(f"{proxy}: no connection succeeded ({errors})")
    return ok, {name: n - before.get(name, 0) for name, n in after.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="conn,tls")
    ap.add_argument("--rates", default="", help="override rates, e.g. tls=50 (connections per second)")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--proxies", default="wasmbed,nginx")
    ap.add_argument("--wasmbed", metavar="BIN", default=pb.WASMBED)
    ap.add_argument("--compare", metavar="BIN", help="a second wasmbed binary, run as proxy wasmbed-b")
    a = ap.parse_args()
    scenarios = a.scenarios.split(",")
    if any(sc not in spc.RATES for sc in scenarios):
        sys.exit(f"--scenarios: of {', '.join(sorted(spc.RATES))}")
    if a.seconds < 1 or a.rounds < 1:
        sys.exit("--seconds and --rounds: at least 1")
    rates = {**spc.RATES, **{sc: r for sc, r in pb.parse_rates(a.rates).items() if sc in spc.RATES}}
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pb.WASMBED = os.path.abspath(a.wasmbed)
    proxies = a.proxies.split(",")
    if a.compare and "wasmbed-b" not in proxies:
        proxies.append("wasmbed-b")
    pb.tools(False, any(p in pb.FLOORS for p in proxies))
    work = tempfile.mkdtemp(prefix="wakeups.")
    backends = []
    try:
        backends = pb.start_backends(work)
        commands = pb.commands_of(work, proxies, a.compare)
        shown = ", ".join(f"{sc} {rates[sc]:,}/s" for sc in scenarios)
        spc.say(f"CPU: {pb.cpu_model()}; {a.rounds} interleaved round(s) of {a.seconds} s at {shown}")
        runs = {}
        for r in range(a.rounds):
            for sc in scenarios:
                for p in [q for q in proxies if q not in pb.FLOORS or sc in pb.FLOOR_SCENARIOS]:
                    ok, woken = run(commands[p], p, sc, rates[sc], a.seconds)
                    busiest = max(woken, key=woken.get)
                    each = {name: n / ok for name, n in woken.items()}
                    runs.setdefault((sc, p), []).append((sum(each.values()), busiest, each[busiest]))
                    spc.say(f"round {r + 1}/{a.rounds} {sc} {p}: {ok} connections, "
                            f"{sum(each.values()):.2f} wake-ups each ({busiest}: {each[busiest]:.2f})")
        spc.say("\n| scenario | proxy | wake-ups per connection, all threads (median) | rounds | the busiest thread |")
        spc.say("|---|---|---:|---|---|")
        for (sc, p), rs in runs.items():
            spc.say(f"| {sc} | {p} | {statistics.median(t for t, _, _ in rs):.2f} | "
                    f"{', '.join(f'{t:.2f}' for t, _, _ in rs)} | {rs[0][1]} {statistics.median(b for _, _, b in rs):.2f} |")
    finally:
        pb.stop_backends(backends, work)


if __name__ == "__main__":
    main()
