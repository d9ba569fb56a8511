#!/usr/bin/env python3
"""User-mode time per connection (per request with `--scenario rr`: keep-alive), sampled:
each proxy at the same fixed rate as peer_bench.py, with `perf record -e cpu-clock -F 10000`
on its processes for the run; the samples whose instruction pointer is outside the kernel,
times 100 µs, divided by the connections (or requests) made.

Why beside peer_bench.py's "proxy user mode": /proc/PID/stat reports user time in 10 ms
units (USER_HZ), so at 600 TLS connections/s a 10 s run's user time is a count of some 10 to
20 of them and its rounds spread by ±50%. Samples at 10 kHz count the same time about 100
times finer. perf's own interrupts add kernel time to every proxy alike; compare user time only.

Usage: python3 bench/user_sampled.py [--rounds 3] [--scenario tls|conn|rr]
         [--proxies wasmbed,floor-tokio,floor-mio,nginx] [--wasmbed BIN] [--out DIR]
         [--compare OTHER_WASMBED_BIN --proxies wasmbed,wasmbed-b,...]
Proxies as in peer_bench.py (floor-tokio and floor-mio: examples/passthrough_floor.rs;
nginx-halfclose: NGINX with `proxy_half_close on`, ending a connection as wasmbed does). Needs
perf, and what peer_bench needs. Writes each run's perf.data to --out (default
target/user-sampled) for `perf report -i FILE --sort dso,sym`, with its connection count
beside it (`.conns`); a sampling first removes the runs an earlier one left there of the
proxies it samples, so that --by-symbol reads one sitting's.

       python3 bench/user_sampled.py --by-symbol A,B [--groups] [--scenario tls] [--top 40]
reads the runs a sampling left in --out instead of running anything: user-mode µs per
connection by symbol, A's and B's (the mean over their runs) and A minus B, the largest
differences either way; with --groups, first summed by the groups of wasmbed's layers below.
Symbols are as perf names them: inlined code counts in its caller, and functions the linker
folded (identical code) go under one of their names.
"""
import argparse
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb  # noqa: E402

FREQ = 10000
# The scenarios the floors run, and keep-alive requests (`rr`, per request), at the bench's rates.
RATES = {sc: pb.RATES[sc] for sc in pb.FLOOR_SCENARIOS + ("rr",)}
TERMLINK = "termlink"  # runs saved by docs/bench/terminate-cpu.sh (PERF_DIR), read by --by-symbol


def user_samples(data):
    """(user, kernel) sample counts of a perf.data, by each sample's CPU mode (`[k]` kernel,
    anything else user)."""
    user = kernel = 0
    for mode, _sym, n in perf_report(data):
        if mode == "k":
            kernel += n
        else:
            user += n
    return user, kernel


# Groups of symbols for --by-symbol's first table, first match wins. By name only: code inlined
# into a wrapper (a span's or a tracker's `poll`) counts in the wrapper's group. Anchored so
# that tokio's scheduler and I/O driver (`tokio::runtime::metrics`, `runtime::io`) stay in the
# rest; its time driver (`runtime::time`) counts as timers.
GROUPS = [
    ("glibc's cancellation points (every system call of a multi-threaded process)", r"asynccancel"),
    ("metrics (counters, histograms)", r"^<?metrics|AtomicBucket|Count>::add"),
    ("supervision (cut trigger or token, task tracker, notify)",
     r"cancellation_token|TrackedFuture|sync::notify::|wasmbed_trigger::|signal::Fired"),
    ("clock reads", r"clock_gettime|Instant|Timespec"),
    ("tracing (span, dispatcher)", r"^<?tracing"),
    # The session's own code either side: ours, and the floor's task with its two copies.
    ("the forwarding (wasmbed's forward::Tcp; the floor's task and tokio::io::copy)",
     r"wasmbed_proxy::forward|passthrough_floor::|tokio::io::util::copy"),
    ("ClientHello, route, balancer, connect",
     r"wasmbed_proxy::(clienthello|route|balancer|upstream|passthrough)|wasmbed_pick|TcpStream::connect|arc_swap"
     r"|net::parser::Parser|parse_ascii"),
    ("timers (timeouts, sleeps, the wheel)", r"tokio::time::|runtime::time::|Sleep|Timeout"),
]
REST = "the rest (the runtime's scheduler and I/O driver, libc, ...)"


def perf_report(data):
    """(mode, symbol, samples) of a perf.data: mode `k` for the kernel's, else user."""
    out = subprocess.run(["perf", "report", "-i", data, "--stdio", "--sort", "sym", "-F", "sample,sym"],
                         capture_output=True, text=True, check=True).stdout
    for line in out.splitlines():
        m = re.match(r"\s*(\d+)\s+\[(.)\]\s+(.*)", line)
        if m:
            yield m.group(2), m.group(3).strip(), int(m.group(1))


def by_symbol(out_dir, proxy, scenario):
    """{symbol: user-mode µs per connection} over a proxy's saved runs (mean of the runs)."""
    pattern = rf"perf\.{re.escape(proxy)}\.{scenario}\.\d+\.data"
    runs = sorted(f for f in os.listdir(out_dir) if re.fullmatch(pattern, f)) if os.path.isdir(out_dir) else []
    if not runs:
        sys.exit(f"no saved run of {proxy} ({scenario}) in {out_dir}: sample it first")
    per = {}
    for f in runs:
        path = os.path.join(out_dir, f)
        try:
            with open(path[: -len(".data")] + ".conns") as c:
                conns = int(c.read())
        except (OSError, ValueError):
            sys.exit(f"{path}: no connection count beside it (a run cut short, or of an older user_sampled.py)")
        if conns <= 0:
            sys.exit(f"{path}: no connection was made in that run")
        for mode, sym, n in perf_report(path):
            if mode != "k":
                per[sym] = per.get(sym, 0.0) + n * 1e6 / FREQ / conns / len(runs)
    return per


def compare_by_symbol(a):
    """--by-symbol: two proxies' saved runs, by group (--groups) and by symbol."""
    pair = a.by_symbol.split(",")
    if len(pair) != 2 or not all(pair):
        sys.exit("--by-symbol takes two proxies: A,B")
    pa, pb_ = pair
    x, y = by_symbol(a.out, pa, a.scenario), by_symbol(a.out, pb_, a.scenario)
    diff = {sym: x.get(sym, 0.0) - y.get(sym, 0.0) for sym in set(x) | set(y)}
    unit = {TERMLINK: "message", "rr": "request"}.get(a.scenario, "connection")
    print(f"{a.scenario}: user mode, µs per {unit} (mean of the runs): {pa} {sum(x.values()):.2f}, "
          f"{pb_} {sum(y.values()):.2f}")
    if a.groups:
        groups = {}
        for sym, d in diff.items():
            name = next((g for g, pat in GROUPS if re.search(pat, sym)), REST)
            groups[name] = groups.get(name, 0.0) + d
        print(f"\n| group | {pa} − {pb_} |\n|---|---:|")
        for name in [g for g, _ in GROUPS] + [REST]:
            print(f"| {name} | {groups.get(name, 0.0):+.2f} |")
    ranked = sorted(diff, key=lambda k: (-diff[k], k))
    more = ranked[: a.top]
    less = [k for k in reversed(ranked[max(len(more), len(ranked) - (a.top + 1) // 2):]) if diff[k] < 0]
    def row(sym):
        print(f"| `{sym[:100]}` | {x.get(sym, 0):.2f} | {y.get(sym, 0):.2f} | {diff[sym]:+.2f} |")
    print(f"\n| symbol | {pa} | {pb_} | {pa} − {pb_} |\n|---|---:|---:|---:|")
    for sym in more:
        row(sym)
    print("| ... | | | |")
    for sym in less:
        row(sym)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--scenario", choices=sorted(RATES) + [TERMLINK], default="tls",
                    help=f"{TERMLINK}: with --by-symbol only, the runs docs/bench/terminate-cpu.sh "
                    "saves with PERF_DIR (terminated sessions over the link, per DATA message)")
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--proxies", default="wasmbed,floor-tokio,floor-mio,nginx")
    ap.add_argument("--wasmbed", metavar="BIN", default=pb.WASMBED)
    ap.add_argument("--threads", type=int, metavar="N", help=pb.THREADS_HELP)
    ap.add_argument("--out", default=os.path.join(pb.REPO, "target", "user-sampled"))
    ap.add_argument("--compare", metavar="BIN", help="a second wasmbed binary, sampled as proxy wasmbed-b")
    ap.add_argument("--by-symbol", metavar="A,B", help="compare two proxies' saved runs by symbol (runs nothing)")
    ap.add_argument("--top", type=int, help="with --by-symbol: how many symbols (default 40)")
    ap.add_argument("--groups", action="store_true", help="with --by-symbol: first the difference by group of "
                    "wasmbed's layers")
    a = ap.parse_args()
    if not shutil.which("perf"):
        sys.exit("needs perf")
    if a.by_symbol:
        a.top = 40 if a.top is None else a.top
        if a.top < 1:
            sys.exit("--top: at least 1")
        compare_by_symbol(a)
        return
    if a.top is not None or a.groups:
        sys.exit("--top and --groups go with --by-symbol")
    if a.scenario == TERMLINK:
        sys.exit(f"--scenario {TERMLINK} goes with --by-symbol (docs/bench/terminate-cpu.sh samples it)")
    if a.rounds < 1 or a.seconds < 1:
        sys.exit("--rounds and --seconds: at least 1")
    # A signal stops everything started (SIGTERM becomes an exit: `finally` below).
    proxies = pb.prepare_sampling(a, a.out)
    work = tempfile.mkdtemp(prefix="user-sampled.")
    backends = []
    per = {p: [] for p in proxies}
    try:
        backends = pb.start_backends(work)
        commands = pb.with_threads(pb.commands_of(work, proxies, a.compare), a.threads)
        for f in os.listdir(a.out):  # one sitting's runs only, for --by-symbol
            if any(re.fullmatch(rf"perf\.{re.escape(p)}\.{a.scenario}\.\d+\.(data|data\.old|conns)", f)
                   for p in proxies):
                os.remove(os.path.join(a.out, f))
        url = {"tls": f"https://127.0.0.1:{pb.PORTS['tls']}/",
               "conn": f"http://127.0.0.1:{pb.PORTS['http']}/",
               "rr": f"http://127.0.0.1:{pb.PORTS['http']}/"}[a.scenario]
        unit = "req" if a.scenario == "rr" else "conn"  # rr: keep-alive, per request
        rate = RATES[a.scenario]
        print(f"CPU: {pb.cpu_model()}; {a.scenario} at {rate}/s, {a.seconds} s per run, {a.rounds} rounds, "
              f"cpu-clock sampled at {FREQ} Hz", flush=True)
        for r in range(a.rounds):
            order = proxies[:]
            random.shuffle(order)  # as peer_bench.py: no proxy always first after the idle wait
            for p in order:
                pb.wait_idle(pb.PROXY_CORE)
                running = pb.Running(p, commands[p])
                try:
                    data = os.path.join(a.out, f"perf.{p}.{a.scenario}.{r}.data")
                    rec = subprocess.Popen(["perf", "record", "-q", "-e", "cpu-clock", "-F", str(FREQ), "-o", data,
                                            "-p", ",".join(map(str, running.pids()))],
                                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                    try:
                        time.sleep(0.5)
                        ok, _p99, errors = pb.h2load(url, rate * a.seconds, rate, a.scenario != "rr")
                    finally:
                        rec.send_signal(signal.SIGINT)
                        rec.wait()
                    with open(data[: -len(".data")] + ".conns", "w") as c:
                        c.write(str(ok))
                finally:
                    running.stop()
                if not ok:
                    sys.exit(f"{p}: no connection succeeded ({errors})")
                user, kernel = user_samples(data)
                us = 1e6 / FREQ
                per[p].append(user * us / ok)
                print(f"round {r + 1}/{a.rounds} {p}: {ok} {unit}s, user {user * us / ok:.2f} µs/{unit}, "
                      f"kernel {kernel * us / ok:.2f} µs/{unit} (with perf's own){' [' + errors + ']' if errors else ''}",
                      flush=True)
    finally:
        pb.stop_backends(backends, work)
    print("\n| proxy | user mode, sampled (median) | rounds |\n|---|---:|---|")
    for p in proxies:
        print(f"| {p} | {statistics.median(per[p]):.2f} µs/{unit} | {', '.join(f'{x:.2f}' for x in per[p])} |")
    # Ratios as peer_bench.py gives them: each round's ratio, geometric mean, t interval on logs.
    runs = {p: [{"round": r, "user": x, "noisy": False} for r, x in enumerate(v)] for p, v in per.items()}
    print("\n| ratio | user mode, sampled | verdict |\n|---|---:|---|")
    for p, b in pb.ratio_pairs(proxies):
        ci, v = pb.fmt_ci(pb.ratio_interval(runs[p], runs[b], "user"))
        print(f"| {p} / {b} | {ci} | {v} |")


if __name__ == "__main__":
    main()
