#!/usr/bin/env python3
"""User-mode instructions per connection, counted: each proxy run under valgrind's callgrind
(every instruction it executes outside the kernel, all its threads), a warm-up, the counts
zeroed, then a fixed number of connections opened one at a time at a low rate, then the
counts dumped and divided by the connections that succeeded.

Why beside user_sampled.py: user time is what a proxy's cost is judged by, but on this shared
host a proxy's sampled user time per connection spreads ±20% from round to round (NGINX 9.6 to
27.6 µs in one sitting), so a cut of a few percent cannot be seen in it. An instruction count
does not depend on what else the host runs: the same binary under the same load reads within
a few percent run to run (how many turns of its event loop a connection takes still
varies: printed beside each run as event-loop waits per connection; with --compare and 2
rounds or more, the two builds are also compared at equal turns, with an interval), and the
functions a change removes show by name (`--by-function`). It is not time: a cache miss or a
locked instruction counts as one instruction, and valgrind runs the proxy some 50 times
slower, so its event loop may batch work differently than at full speed (the rate is kept
low for that: each connection alone). glibc's string functions are counted apart: valgrind
counts each step of a `rep stos`/`rep movs` as an instruction (zeroing 8 KiB: 8,192). Read
it beside the sampled time, never instead of it.

Usage: python3 bench/user_instructions.py [--scenario tls|conn|rr] [--proxies wasmbed,floor-tokio,nginx]
         [--connections 1000] [--rate 50] [--rounds 1] [--wasmbed BIN] [--compare BIN] [--out DIR]
       python3 bench/user_instructions.py --by-function A,B [--scenario tls] [--top 40] [--out DIR]
Proxies as in peer_bench.py (wasmbed-b: the --compare binary; floor-tokio, floor-mio:
examples/passthrough_floor.rs; nginx-halfclose: NGINX with `proxy_half_close on`, ending a
connection as wasmbed does). Only the process serving the scenario runs under valgrind
(wasmbed runs one process per listener; NGINX with `master_process off`, its worker's loop in
one process); `callgrind_control` starts, zeroes and dumps the counts of those processes only.
Needs valgrind (`apt-get install valgrind`) and what peer_bench needs. Keeps each run's
callgrind dumps in --out (default target/user-instructions) for `callgrind_annotate FILE`;
--by-function reads them: instructions per connection by function, A's and B's (the mean over
their runs), and the largest differences. Scenarios: `tls` and `conn`, a connection per
request, counted per connection (TLS passthrough; plain TCP through `--allow-plain`); `rr`,
keep-alive requests over 4 long connections through the plain listener, counted per request
(what a long session's message costs).
"""

import argparse
import glob
import math
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import peer_bench as pb  # noqa: E402

POOL = {"tls": "tls", "conn": "http", "rr": "http"}
# What a scenario counts per, short and in words: a connection (a request on a connection of
# its own), or, for `rr`, a request on a long keep-alive connection (a device's message on its
# session).
UNIT = {"tls": ("conn", "connection"), "conn": ("conn", "connection"), "rr": ("req", "request")}
WARMUP = 100
# rr: the requests go over this many keep-alive connections, opened when the counting starts
# (their setup is in the count: at the default 1,000 requests about 4 × 15k instructions, 60
# per request, the same for every proxy).
RR_CONNECTIONS = 4


def under_valgrind(commands, scenario, out_prefix):
    """`commands` (peer_bench's, for one proxy) with the process serving `scenario` run under
    callgrind, not counting until told (`callgrind_control -i on`)."""
    vg = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--vgdb=yes",
          f"--callgrind-out-file={out_prefix}.%p"]
    wrapped = []
    for cmd, pool in commands:
        if pool in (POOL[scenario], "all"):
            # NGINX's worker is a fork that callgrind_control does not reach: one process
            # (NGINX's own debugging mode; the worker's event loop and modules as they are).
            cmd = vg + cmd + (["-g", "master_process off;"] if os.path.basename(cmd[0]) == "nginx" else [])
        wrapped.append((cmd, pool))
    return wrapped


def control(pids, *args):
    """`callgrind_control ARGS PID` for each of `pids` (not every callgrind run of the user's)."""
    for pid in pids:
        subprocess.run(["callgrind_control", *args, str(pid)], check=True,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def h2load(args, url):
    """h2load (HTTP/1.1, one thread, on the load core) with `args` against `url`:
    (requests that succeeded, the errors in words)."""
    out = subprocess.run(["taskset", "-c", str(pb.LOAD_CORE), "h2load", "--h1", "-t1", *args, url],
                         capture_output=True, text=True, check=True).stdout
    m = re.search(r"requests: \d+ total, \d+ started, \d+ done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                  r"(\d+) timeout", out)
    if not m:
        sys.exit(f"h2load: no summary in its output:\n{out}")
    ok, failed, errored, timeout = (int(x) for x in m.groups())
    errors = ", ".join(f"{n} {what}" for n, what in ((failed, "failed"), (errored, "errored"), (timeout, "timeout")) if n)
    return ok, errors


def connections(url, count, rate):
    """`count` connections, one request each, opened one at a time `1/rate` s apart
    (peer_bench's h2load opens them in groups every 5 ms: at least 200/s): (succeeded, errors)."""
    return h2load(["-c", str(count), "-n", str(count), "-r", "1", "--rate-period", f"{max(1, round(1000 / rate))}ms"],
                  url)


def requests(url, count, rate):
    """`count` requests at `rate` per second in all over `RR_CONNECTIONS` keep-alive
    connections (h2load's --rps is per connection): (succeeded, errors)."""
    per_connection = max(1, round(rate / RR_CONNECTIONS))
    return h2load(["-c", str(RR_CONNECTIONS), "-n", str(count), "--rps", str(per_connection)], url)


def valgrind_pids(running):
    """The processes of `running` that run under valgrind (its tool's name is in their command)."""
    pids = []
    for pid in running.pids():
        try:
            exe = os.readlink(f"/proc/{pid}/exe")
        except OSError:
            continue
        if "valgrind" in exe or "callgrind" in exe or "memcheck" in exe:
            pids.append(pid)
    return pids


# glibc's string functions: valgrind counts each step of a `rep stos`/`rep movs` (what glibc's
# `erms` variants use for large sizes) as one instruction, so zeroing a buffer of 8 KiB counts
# 8,192 where the processor takes a few hundred cycles. Counted apart (`without strings`).
STRINGS = re.compile(r"__(memset|memcpy|memmove|mempcpy)\w*")


def flat_profile(dump):
    """(function, self instructions) of a callgrind dump, by `callgrind_annotate`."""
    out = subprocess.run(["callgrind_annotate", "--inclusive=no", "--auto=no", "--threshold=100", dump],
                         capture_output=True, text=True, check=True).stdout
    # The flat profile: the block under the "file:function" header.
    flat = re.split(r"file:function\s*\n-+\n", out, maxsplit=1)[-1].split("\n\n", 1)[0]
    for line in flat.splitlines():
        m = re.match(r"\s*([\d,]+)\s+(?:\([^)]*\)\s+)?(\S.*)$", line)
        if not m or ":" not in m.group(2):
            continue
        fn = m.group(2).split(":", 1)[1].strip()
        yield re.sub(r"\s+\[[^\]]*\]$", "", fn), int(m.group(1).replace(",", ""))


def instructions(paths):
    """The instructions (Ir) counted in callgrind dumps, and those in glibc's string functions."""
    total = strings = 0
    for path in paths:
        for fn, ir in flat_profile(path):
            total += ir
            if STRINGS.fullmatch(fn):
                strings += ir
    return total, strings


# The call by which an event loop waits for its next events (mio's, through the binary's
# `__wrap_` when its system calls skip glibc's cancellation points; NGINX's), counted per
# connection beside the instructions: under valgrind how many turns a connection takes varies
# from run to run (whether a socket's next event is already there when the loop comes back),
# and each turn costs the runtime's whole path around it (wasmbed: ~1.2-1.5k instructions in
# all, docs/performance.md, "System calls without cancellation points").
WAITS = re.compile(r"(__wrap_)?epoll_p?wait")


def waits(paths):
    """Calls into an event loop's wait (`WAITS`) in callgrind dumps: read from the dumps' call
    lines (`cfn=` names the function called, `calls=` how many times), names compressed as
    callgrind writes them (`(id) name` the first time, in an `fn=` or a `cfn=` line; `(id)`
    after)."""
    count = 0
    for path in paths:
        names, callee = {}, None
        with open(path, errors="replace") as f:
            for line in f:
                key, _, value = line.partition("=")
                if key in ("fn", "cfn"):
                    m = re.match(r"\((\d+)\)(?: (.*))?", value.strip())
                    if m and m.group(2):
                        names[m.group(1)] = m.group(2)
                    if key == "cfn":
                        callee = names.get(m.group(1)) if m else value.strip()
                elif key == "calls" and callee and WAITS.fullmatch(callee):
                    count += int(value.split()[0])
    return count


def by_function(out_dir, proxy, scenario):
    """Instructions per connection by function (self cost), the mean over `proxy`'s runs; and
    the event-loop waits per connection of each run."""
    runs = sorted(glob.glob(os.path.join(out_dir, f"cg.{proxy}.{scenario}.*.conns")))
    if not runs:
        sys.exit(f"no runs of {proxy} ({scenario}) in {out_dir}")
    per, turns = {}, []
    for conns_file in runs:
        conns = int(open(conns_file).read())
        stem = conns_file[: -len(".conns")]
        dumps = [d for d in glob.glob(glob.escape(stem) + ".*.*") if not d.endswith(".conns")]
        for dump in dumps:
            for fn, ir in flat_profile(dump):
                per[fn] = per.get(fn, 0) + ir / conns / len(runs)
        turns.append(waits(dumps) / conns)
    return per, turns


def compare_by_function(a):
    name_a, name_b = a.by_function.split(",")
    (fa, wa), (fb, wb) = by_function(a.out, name_a, a.scenario), by_function(a.out, name_b, a.scenario)
    ta, tb = sum(fa.values()), sum(fb.values())
    if not ta or not tb:
        sys.exit(f"no instructions read from the runs of {name_b if ta else name_a}")
    sa = ta - sum(v for f, v in fa.items() if STRINGS.fullmatch(f))
    sb = tb - sum(v for f, v in fb.items() if STRINGS.fullmatch(f))
    word = UNIT[a.scenario][1]
    print(f"{a.scenario}: user-mode instructions per {word} (mean of the runs): "
          f"{name_a} {ta:,.0f}, {name_b} {tb:,.0f} ({ta / tb:.3f}×); without glibc's string functions "
          f"{sa:,.0f} and {sb:,.0f} ({sa / sb:.3f}×); event-loop waits per {word}, each run: "
          f"{name_a} {', '.join(f'{w:.2f}' for w in wa)}, {name_b} {', '.join(f'{w:.2f}' for w in wb)}\n")
    print(f"| function | {name_a} | {name_b} | {name_a} − {name_b} |\n|---|---:|---:|---:|")
    diffs = sorted(set(fa) | set(fb), key=lambda f: fa.get(f, 0) - fb.get(f, 0))
    if len(diffs) <= a.top:
        shown = diffs[::-1]
    else:
        half = a.top // 2
        shown = diffs[::-1][:a.top - half] + ["..."] + diffs[:half][::-1]
    for f in shown:
        if f == "...":
            print("| ... | | | |")
            continue
        x, y = fa.get(f, 0), fb.get(f, 0)
        if abs(x - y) < 0.5:
            continue
        print(f"| `{f[:110]}` | {x:,.0f} | {y:,.0f} | {x - y:+,.0f} |")


def at_equal_turns(runs_a, runs_b):
    """A's instructions per unit minus B's at the same number of event-loop turns, with
    a 95% interval: under valgrind how many turns a connection takes varies from run to run,
    and each turn costs the runtime's whole path (~1.2-1.5k instructions), enough to hide a
    change of a few percent in a comparison of medians. Fits `instructions = level + slope ×
    turns` over both proxies' runs, a level for each and one slope for both (the analysis of
    covariance; fair for two builds of one program whose change leaves the turns alone, not
    for two programs, whose turns cost differently, nor for a change to how many turns a
    connection takes, whose effect is those turns), and returns (difference of the levels,
    its interval's two ends, the slope, B's runs' mean), or None when the runs cannot fit it
    (fewer than 2 runs of either, or no spread in turns within them). `runs_*`:
    (instructions, _, turns) each."""
    if len(runs_a) < 2 or len(runs_b) < 2:
        return None
    groups = []
    for runs in (runs_a, runs_b):
        xs, ys = [r[2] for r in runs], [r[0] for r in runs]
        groups.append((xs, ys, statistics.mean(xs), statistics.mean(ys)))
    sxx = sum((x - mx) ** 2 for xs, _, mx, _ in groups for x in xs)
    if sxx == 0:
        return None
    slope = sum((x - mx) * (y - my) for xs, ys, mx, my in groups for x, y in zip(xs, ys)) / sxx
    residual = sum((y - my - slope * (x - mx)) ** 2 for xs, ys, mx, my in groups for x, y in zip(xs, ys))
    df = len(runs_a) + len(runs_b) - 3
    (xa, _, mxa, mya), (xb, _, mxb, myb) = groups
    diff = (mya - myb) - slope * (mxa - mxb)
    se = math.sqrt(residual / df * (1 / len(xa) + 1 / len(xb) + (mxa - mxb) ** 2 / sxx))
    half = pb.T975[min(df, len(pb.T975)) - 1] * se
    return diff, diff - half, diff + half, slope, myb


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scenario", choices=sorted(POOL), default="tls")
    ap.add_argument("--proxies", default="wasmbed,floor-tokio,nginx")
    ap.add_argument("--connections", type=int, default=1000,
                    help="connections (rr: requests) counted per run (default 1000)")
    ap.add_argument("--rate", type=int, default=50, help="connections per second (default 50: valgrind is slow)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--wasmbed", metavar="BIN", default=pb.WASMBED)
    ap.add_argument("--compare", metavar="BIN", help="a second wasmbed binary, counted as proxy wasmbed-b")
    ap.add_argument("--threads", type=int, metavar="N",
                    help=pb.THREADS_HELP + "; under valgrind a process's threads take turns anyway, so this "
                         "counts the work of N threads' scheduling, not its parallelism")
    ap.add_argument("--out", default=os.path.join(pb.REPO, "target", "user-instructions"))
    ap.add_argument("--by-function", metavar="A,B", help="compare two proxies' saved runs by function (runs nothing)")
    ap.add_argument("--top", type=int, default=40, help="with --by-function: how many functions (default 40)")
    a = ap.parse_args()
    for tool in ("callgrind_annotate",) if a.by_function else ("valgrind", "callgrind_control", "callgrind_annotate"):
        if not shutil.which(tool):
            sys.exit(f"needs {tool} (apt-get install valgrind)")
    if a.by_function:
        if a.by_function.count(",") != 1 or a.top < 1:
            sys.exit("--by-function A,B (two proxies); --top at least 1")
        compare_by_function(a)
        return
    if a.connections < 1 or a.rate < 1 or a.rounds < 1:
        sys.exit("--connections, --rate and --rounds: at least 1")
    # A signal stops everything started (SIGTERM becomes an exit: `finally` below).
    proxies = pb.prepare_sampling(a, a.out)
    for p in proxies:  # one sitting's runs only, for --by-function
        for f in glob.glob(os.path.join(a.out, f"cg.{glob.escape(p)}.{a.scenario}.*")):
            os.remove(f)
    work = tempfile.mkdtemp(prefix="user-instructions.")
    backends = []
    per = {p: [] for p in proxies}
    pool = POOL[a.scenario]
    url = f"{'https' if pool == 'tls' else 'http'}://127.0.0.1:{pb.PORTS[pool]}/"
    unit, word = UNIT[a.scenario]
    load = requests if a.scenario == "rr" else connections
    try:
        backends = pb.start_backends(work)
        commands = pb.with_threads(pb.commands_of(work, proxies, a.compare), a.threads)
        over = f" over {RR_CONNECTIONS} keep-alive connections" if a.scenario == "rr" else ""
        print(f"CPU: {pb.cpu_model()}; {a.scenario}: {a.connections} {word}s{over} at {a.rate}/s per run "
              f"after {WARMUP} of warm-up, {a.rounds} round(s), under valgrind --tool=callgrind", flush=True)
        for r in range(a.rounds):
            order = proxies[:]
            random.shuffle(order)
            for p in order:
                stem = os.path.join(a.out, f"cg.{p}.{a.scenario}.{r}")
                running = pb.Running(p, under_valgrind(commands[p], a.scenario, stem))
                try:
                    warm, errors = load(url, WARMUP, a.rate)
                    if warm < WARMUP:
                        sys.exit(f"{p}: warm-up {warm} of {WARMUP} ({errors})")
                    time.sleep(0.5)  # the warm-up's last closes
                    pids = valgrind_pids(running)
                    if not pids:
                        sys.exit(f"{p}: no process under valgrind")
                    control(pids, "-i", "on")
                    control(pids, "-z")
                    ok, errors = load(url, a.connections, a.rate)
                    time.sleep(0.5)
                    before = set(glob.glob(glob.escape(stem) + ".*"))
                    control(pids, "-d")
                    dumps = sorted(set(glob.glob(glob.escape(stem) + ".*")) - before)
                finally:
                    running.stop()
                # What the final exit wrote is not this run's count: only the explicit dump's.
                for f in set(glob.glob(glob.escape(stem) + ".*")) - set(dumps):
                    os.remove(f)
                if not ok or not dumps:
                    sys.exit(f"{p}: {ok} {word}s, {len(dumps)} dumps ({errors})")
                total, strings = instructions(dumps)
                if not total:
                    sys.exit(f"{p}: no instruction counted (callgrind_control did not reach the process?)")
                with open(stem + ".conns", "w") as c:
                    c.write(str(ok))
                per[p].append(((total - strings) / ok, total / ok, waits(dumps) / ok))
                print(f"round {r + 1}/{a.rounds} {p}: {ok} {unit}s, {total / ok:,.0f} user-mode instructions/{unit}, "
                      f"{(total - strings) / ok:,.0f} without glibc's string functions, "
                      f"{per[p][-1][2]:.2f} event-loop waits/{unit}"
                      f"{' [' + errors + ']' if errors else ''}", flush=True)
    finally:
        pb.stop_backends(backends, work)
    med = {p: [statistics.median(x[i] for x in per[p]) for i in (0, 1)] for p in proxies}
    print(f"\n| proxy | user-mode instructions per {word}, without glibc's string functions (median) "
          f"| all (median) | rounds (without) | event-loop waits per {word}, rounds |\n|---|---:|---:|---|---|")
    for p in proxies:
        print(f"| {p} | {med[p][0]:,.0f} | {med[p][1]:,.0f} | {', '.join(f'{x[0]:,.0f}' for x in per[p])} "
              f"| {', '.join(f'{x[2]:.2f}' for x in per[p])} |")
    print("\n| ratio | instructions without strings | all instructions |\n|---|---:|---:|")
    for p, b in pb.ratio_pairs(proxies):
        print(f"| {p} / {b} | {med[p][0] / med[b][0]:.3f}× | {med[p][1] / med[b][1]:.3f}× |")
    if "wasmbed" in per and "wasmbed-b" in per:
        fit = at_equal_turns(per["wasmbed"], per["wasmbed-b"])
        if fit is None:
            print("\nwasmbed − wasmbed-b at equal event-loop turns: needs 2 rounds or more, with turns that vary")
        else:
            diff, lo, hi, slope, base = fit
            verdict = "level" if lo <= 0 <= hi else ("lower" if hi < 0 else "higher")
            turns_a, turns_b = [x[2] for x in per["wasmbed"]], [x[2] for x in per["wasmbed-b"]]
            if max(turns_a) < min(turns_b) or max(turns_b) < min(turns_a):
                # The change moved the turns themselves: "at equal turns" would be a point
                # neither build reaches.
                verdict += ("; but the two builds' turns do not overlap (the change alters how many "
                            f"turns a {word} takes): compare their medians, not this")
            print(f"\nwasmbed − wasmbed-b at equal event-loop turns (one slope fitted over both's runs: "
                  f"{slope:,.0f} instructions per turn): {diff:+,.0f} instructions per {word} "
                  f"[{lo:+,.0f}, {hi:+,.0f}], {(base + diff) / base:.3f}× wasmbed-b's mean, {verdict}")


if __name__ == "__main__":
    main()
