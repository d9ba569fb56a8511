#!/bin/bash
# Proxy CPU per DATA message through terminated sessions: `wasmbed up` with N devices at RATE
# DATA/s each over 5 gateways; once all are connected (and 3 s more), the proxy's user and
# system time from /proc/PID/stat over WINDOW seconds, divided by the messages the devices
# were asked to send in it (N x RATE x WINDOW). Each binary given is run REPS times,
# interleaved (A B A B ...), each run printed; with two or more binaries, the first's cost
# per message over the second's: the geometric mean of the rounds' ratios and its 95% interval
# (Student's t on the log ratios, as bench/peer_bench.py; "level" when it contains 1.0).
# Release builds; run from the repository root:
#   bash docs/bench/terminate-cpu.sh NEW_BIN OLD_BIN
# N (default 3000), RATE (default 2), WINDOW (default 20), REPS (default 3),
# VARIANT: link (default; --upstream link) or quic-link (QUIC devices).
# PERF_DIR=DIR: also samples the proxy over the window (`perf record -e cpu-clock -F 10000`),
# to DIR/perf.BINNAME.termlink.RUN.data with the messages beside it (.conns), as
# bench/user_sampled.py names its runs (earlier runs of the same binaries there are removed
# first): `python3 bench/user_sampled.py --by-symbol A,B --scenario termlink --out DIR`.
# BINNAME is the binary's file name: the binaries compared must have different ones.
# CONNECT_TIMEOUT (default 300): seconds for the fleet to connect before the run fails.
# TRACE=1: also counts the proxy's system calls (`perf trace -s` on the threads it has, from
# 1 s before the window to its end) and prints them per message sent in the time traced,
# failed ones apart. Tracing slows every call: the CPU figures of such runs do not compare
# with untraced ones (compare the counts).
set -u
[ $# -ge 1 ] || { echo "usage: bash docs/bench/terminate-cpu.sh BIN [BIN...]" >&2; exit 2; }
N=${N:-3000} RATE=${RATE:-2} WINDOW=${WINDOW:-20} REPS=${REPS:-3}
case ${VARIANT:-link} in
  link) ARGS="--mode terminate --upstream link" ;;
  quic-link) ARGS="--mode terminate --upstream link --transport quic" ;;
  *) echo "VARIANT: link or quic-link" >&2; exit 2 ;;
esac
ticks=$(getconf CLK_TCK)
if [ -n "${PERF_DIR:-}" ] || [ "${TRACE:-0}" = 1 ]; then
  command -v perf >/dev/null || { echo "PERF_DIR and TRACE=1 need perf" >&2; exit 2; }
fi
if [ -n "${PERF_DIR:-}" ]; then
  names=$(for b in "$@"; do basename "$b"; done | sort | uniq -d)
  [ -z "$names" ] || { echo "binaries with the same file name: $names (PERF_DIR names runs by it)" >&2; exit 2; }
fi
cpu_of() { # pid -> user and system ticks
  awk '{print $14, $15}' "/proc/$1/stat"
}
run() { # binary, run number
  local b=$1 rep=$2 out
  out=$(mktemp)
  # shellcheck disable=SC2086
  "$b" up $ARGS --gateways 5 --devices "$N" --rate "$RATE" --ramp 1000 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1 &
  local up=$! waited=0
  until grep -Eq "connected +$N/$N" "$out"; do
    if ! kill -0 "$up" 2>/dev/null || [ "$waited" -ge "${CONNECT_TIMEOUT:-300}" ]; then
      echo "$b: the fleet did not connect ($waited s):" >&2; tail -5 "$out" >&2
      kill -INT "$up" 2>/dev/null; wait "$up" 2>/dev/null; rm -f "$out"; return 1
    fi
    sleep 1; waited=$((waited + 1))
  done
  sleep 3
  local proxy
  proxy=$(pgrep -P "$up" -f " proxy --listen")
  if [ -z "$proxy" ]; then
    echo "$b: no proxy process under up ($up)" >&2
    kill -INT "$up"; wait "$up" 2>/dev/null; rm -f "$out"; return 1
  fi
  local rec="" data=""
  if [ -n "${PERF_DIR:-}" ]; then
    data="$PERF_DIR/perf.$(basename "$b").termlink.$rep.data"
    perf record -q -e cpu-clock -F 10000 -p "$proxy" -o "$data" >/dev/null 2>&1 &
    rec=$!
  fi
  local trace="" traced="" traced_from=""
  if [ "${TRACE:-0}" = 1 ]; then
    traced=$(mktemp)
    traced_from=$(date +%s.%N)
    perf trace -s -p "$proxy" -o "$traced" >/dev/null 2>&1 &
    trace=$!
    sleep 1 # perf attaches to every thread before the window opens
  fi
  read -r u0 s0 <<< "$(cpu_of "$proxy")"
  sleep "$WINDOW"
  read -r u1 s1 <<< "$(cpu_of "$proxy")"
  local traced_msgs=0
  if [ -n "$trace" ]; then
    kill -INT "$trace" 2>/dev/null; wait "$trace" 2>/dev/null
    # The messages of the whole time traced (the attach's own moments count as traced: the
    # counts read a little low, never high).
    traced_msgs=$(awk -v a="$traced_from" -v b="$(date +%s.%N)" -v n="$N" -v r="$RATE" \
      'BEGIN { printf "%d", n * r * (b - a) }')
  fi
  if [ -n "$rec" ]; then
    kill -INT "$rec" 2>/dev/null; wait "$rec" 2>/dev/null
    if [ -s "$data" ]; then
      echo $(( N * RATE * WINDOW )) > "${data%.data}.conns"
    else
      echo "$b: perf recorded nothing (perf_event_paranoid?)" >&2
    fi
  fi
  kill -INT "$up"; wait "$up" 2>/dev/null
  rm -f "$out"
  local msgs=$(( N * RATE * WINDOW ))
  awk -v b="$b" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$ticks" -v m="$msgs" -v w="$WINDOW" 'BEGIN {
    printf "%s: proxy %.3f cores (user %.3f, system %.3f) over %d s; %.1f µs per message (user %.1f)\n",
      b, (u + s) / t / w, u / t / w, s / t / w, w, (u + s) / t / m * 1e6, u / t / m * 1e6 }'
  awk -v b="$b" -v r="$rep" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$ticks" -v m="$msgs" 'BEGIN {
    printf "%s\t%d\t%.3f\t%.3f\n", b, r, (u + s) / t / m * 1e6, u / t / m * 1e6 }' >> "$RESULTS"
  if [ -n "$traced" ]; then
    # perf trace -s: per thread, "syscall calls errors total min avg max stddev".
    awk -v m="$traced_msgs" '$1 ~ /^[a-z_0-9]+$/ && $2 ~ /^[0-9]+$/ && $3 ~ /^[0-9]+$/ && NF >= 8 {
        calls[$1] += $2; errs[$1] += $3; all += $2 }
      END {
        if (all == 0) { print "  system calls: none traced (perf trace failed?)"; exit }
        n = 0; for (c in calls) names[n++] = c
        for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (calls[names[j]] > calls[names[i]]) { x = names[i]; names[i] = names[j]; names[j] = x }
        line = sprintf("  system calls per message: all %.2f;", all / m)
        for (i = 0; i < n && i < 8; i++) {
          c = names[i]; line = line sprintf(" %s %.2f", c, calls[c] / m)
          if (errs[c] > 0) line = line sprintf(" (%.2f failed)", errs[c] / m)
          line = line (i + 1 < n && i < 7 ? "," : "")
        }
        print line }' "$traced"
    rm -f "$traced"
  fi
}
RESULTS=$(mktemp)
trap 'rm -f "$RESULTS"' EXIT
lscpu | grep "Model name"
echo "${VARIANT:-link}: $N devices, $RATE DATA/s each, $WINDOW s window, $REPS runs of each, interleaved"
if [ -n "${PERF_DIR:-}" ]; then
  mkdir -p "$PERF_DIR"
  for b in "$@"; do rm -f "$PERF_DIR/perf.$(basename "$b").termlink."*; done
fi
for rep in $(seq 0 $((REPS - 1))); do
  for b in "$@"; do run "$b" "$rep"; done
done
if [ $# -ge 2 ]; then
  python3 - "$RESULTS" "$1" "$2" "$(dirname "$0")/../../bench" <<'PY'
import os, sys
path, a, b, bench = sys.argv[1:5]
sys.path.insert(0, bench)
import peer_bench as pb
runs = {}
for line in open(path):
    name, rnd, total, user = line.rstrip("\n").split("\t")
    runs.setdefault(name, []).append({"round": int(rnd), "noisy": False, "total": float(total), "user": float(user)})
for key, what in (("total", "proxy CPU"), ("user", "user mode")):
    ci = pb.ratio_interval(runs.get(a, []), runs.get(b, []), key)
    if ci is None:
        print(f"{os.path.basename(a)} / {os.path.basename(b)}: no round where both ran")
        break
    text, verdict = pb.fmt_ci(ci)
    print(f"{os.path.basename(a)} / {os.path.basename(b)}, {what} per message: {text} {verdict}")
PY
fi
