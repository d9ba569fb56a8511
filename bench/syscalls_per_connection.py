#!/usr/bin/env python3
"""System calls per connection: each proxy under peer_bench.py's own load (h2load, a
connection per request, at the bench's rates, the proxy pinned to core 1), traced with
`perf trace -s` on every thread of the proxy for the run, the threads' calls summed and
divided by the connections made. A count, not a time: whether two proxies ask the kernel for
the same work per connection, so that a difference in user-mode time (user_sampled.py) is
the cost of each event and not a different number of events.

Usage: python3 bench/syscalls_per_connection.py [--scenarios conn,tls] [--seconds 5]
         [--proxies wasmbed,floor-tokio,floor-mio,haproxy,nginx] [--wasmbed BIN]
         [--rates tls=50,...]
`--rates` offers other rates than the bench's (a light load, where each connection's events
come alone, against the bench's, where a wake-up serves several).
Needs perf (with its trace subcommand) and what peer_bench.py needs. "failed" counts the
calls that returned an error (mostly EAGAIN: a read or an accept that found nothing; and the
connect of a non-blocking socket, EINPROGRESS). Tracing every call slows a proxy down: one
that cannot keep the rate and has no limits (the floors) piles connections up, and the
calls of connections that failed at h2load count in the totals. The counts in
docs/performance.md before 2026-12-04 came from an earlier version of this script
(`strace -c -f` under wrk with `Connection: close`), whose TLS connections took fewer calls:
the two sets do not compare. `--scenarios tlsterm` counts TLS termination too (a handshake
per connection; not the floors, which terminate nothing).
"""
import argparse
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb  # noqa: E402

RATES = {sc: pb.RATES[sc] for sc in pb.FLOOR_SCENARIOS + ("tlsterm",)}
URLS = {"tls": f"https://127.0.0.1:{pb.PORTS['tls']}/", "conn": f"http://127.0.0.1:{pb.PORTS['http']}/",
        "tlsterm": f"https://127.0.0.1:{pb.PORTS['tlsterm']}/"}
# A row of `perf trace -s`'s per-thread table: name, calls, errors, then the times.
ROW = re.compile(r"\s+(\w+)\s+(\d+)\s+(\d+)\s+[\d.]+\s")


def say(line=""):
    """Prints; a closed stdout loses the line, not the cleanup."""
    try:
        print(line, flush=True)
    except (BrokenPipeError, OSError):
        pass


def summed(path):
    """{syscall: (calls, failed)} over every thread of a `perf trace -s` output."""
    out = {}
    with open(path) as f:
        for line in f:
            m = ROW.match(line)
            if m:
                calls, failed = out.get(m.group(1), (0, 0))
                out[m.group(1)] = (calls + int(m.group(2)), failed + int(m.group(3)))
    return out


def traced(command, proxy, scenario, rate, seconds, work):
    """(connections, {syscall: (calls, failed)}) of one traced run."""
    pb.wait_idle(pb.PROXY_CORE)
    running = pb.Running(proxy, command)
    try:
        out = os.path.join(work, f"trace.{proxy}.{scenario}.txt")
        rec = subprocess.Popen(["perf", "trace", "-s", "-o", out, "-p", ",".join(map(str, running.pids()))],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            time.sleep(1.0)  # perf attaches to every thread before the load starts
            ok, _p99, errors = pb.h2load(URLS[scenario], rate * seconds, rate, True)
        finally:
            rec.send_signal(signal.SIGINT)
            _, perf_err = rec.communicate()
    finally:
        running.stop()
    if not ok:
        sys.exit(f"{proxy}: no connection succeeded ({errors})")
    calls = summed(out) if os.path.exists(out) else {}
    if not calls:
        sys.exit(f"{proxy}: `perf trace -s` gave no table (exit {rec.returncode}): {perf_err.strip()[-500:]}")
    return ok, calls


def table(scenario, per):
    """The per-connection table of one scenario, the busiest calls first."""
    def each(ok, s, n):
        return s.get(n, (0, 0))[0] / ok
    names = sorted({n for _, s in per.values() for n in s}, key=lambda n: -max(each(ok, s, n) for ok, s in per.values()))
    say(f"\n| {scenario}, per connection | " + " | ".join(per) + " |\n|---|" + "---:|" * len(per))
    say("| **all** | " + " | ".join(f"**{sum(c for c, _ in s.values()) / ok:.2f}**" for ok, s in per.values()) + " |")
    for n in names:
        if all(each(ok, s, n) < 0.01 for ok, s in per.values()):
            continue
        cells = []
        for ok, s in per.values():
            calls, failed = s.get(n, (0, 0))
            cells.append(f"{calls / ok:.2f}" + (f" ({failed / ok:.2f} failed)" if failed / ok >= 0.01 else ""))
        say(f"| {n} | " + " | ".join(cells) + " |")
    say()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenarios", default="conn,tls")
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--proxies", default="wasmbed,floor-tokio,floor-mio,haproxy,nginx")
    ap.add_argument("--wasmbed", metavar="BIN", default=pb.WASMBED)
    ap.add_argument("--rates", default="", help="override rates, e.g. tls=50 (connections per second)")
    a = ap.parse_args()
    rates = {**RATES, **{sc: r for sc, r in pb.parse_rates(a.rates).items() if sc in RATES}}
    scenarios = a.scenarios.split(",")
    if any(sc not in RATES for sc in scenarios):
        sys.exit(f"--scenarios: of {', '.join(sorted(RATES))}")
    if a.seconds < 1:
        sys.exit("--seconds: at least 1")
    if not shutil.which("perf"):
        sys.exit("needs perf")
    # A closed stdout (`| head`) or a signal must not leave the proxies and backends running:
    # SIGPIPE is ignored (say() drops the line), SIGTERM becomes an exit, and `finally` stops
    # everything started.
    signal.signal(signal.SIGPIPE, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    pb.WASMBED = os.path.abspath(a.wasmbed)
    proxies = a.proxies.split(",")
    pb.tools(False, any(p in pb.FLOORS for p in proxies))
    work = tempfile.mkdtemp(prefix="syscalls.")
    backends = []
    try:
        backends = pb.start_backends(work)
        commands = pb.proxy_commands(work)
        unknown = [p for p in proxies if p not in commands]
        if unknown:
            sys.exit(f"unknown proxy(ies): {', '.join(unknown)}")
        shown = ", ".join(f"{sc} {rates[sc]:,}/s" for sc in scenarios)
        say(f"CPU: {pb.cpu_model()}; {a.seconds} s per run at {shown}")
        for sc in scenarios:
            per = {}
            # The floors only accept, connect and copy: no TLS of their own to terminate.
            for p in [q for q in proxies if q not in pb.FLOORS or sc in pb.FLOOR_SCENARIOS]:
                per[p] = traced(commands[p], p, sc, rates[sc], a.seconds, work)
                ok, calls = per[p]
                say(f"{sc} {p}: {ok} connections, {sum(c for c, _ in calls.values()) / ok:.2f} system calls each")
            table(sc, per)
    finally:
        pb.stop_backends(backends, work)


if __name__ == "__main__":
    main()
