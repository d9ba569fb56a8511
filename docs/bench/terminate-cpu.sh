#!/bin/bash
# Proxy CPU per DATA message through terminated sessions: `wasmbed up` with N devices at RATE
# DATA/s each over 5 gateways; once all are connected (and 3 s more), the proxy's user and
# system time from /proc/PID/stat over WINDOW seconds, divided by the messages the devices
# were asked to send in it (N x RATE x WINDOW). Each binary given is run REPS times,
# interleaved (A B A B ...), each run printed.
# Release builds; run from the repository root:
#   bash docs/bench/terminate-cpu.sh NEW_BIN OLD_BIN
# N (default 3000), RATE (default 2), WINDOW (default 20), REPS (default 3),
# VARIANT: link (default; --upstream link) or quic-link (QUIC devices).
# PERF_DIR=DIR: also samples the proxy over the window (`perf record -e cpu-clock -F 10000`),
# to DIR/perf.BINNAME.RUN.data with the messages beside it (.conns), as bench/user_sampled.py
# names its runs: `python3 bench/user_sampled.py --by-symbol A,B --scenario termlink --out DIR`.
set -u
[ $# -ge 1 ] || { echo "usage: bash docs/bench/terminate-cpu.sh BIN [BIN...]" >&2; exit 2; }
N=${N:-3000} RATE=${RATE:-2} WINDOW=${WINDOW:-20} REPS=${REPS:-3}
case ${VARIANT:-link} in
  link) ARGS="--mode terminate --upstream link" ;;
  quic-link) ARGS="--mode terminate --upstream link --transport quic" ;;
  *) echo "VARIANT: link or quic-link" >&2; exit 2 ;;
esac
ticks=$(getconf CLK_TCK)
cpu_of() { # pid -> user and system ticks
  awk '{print $14, $15}' "/proc/$1/stat"
}
run() { # binary, run number
  local b=$1 rep=$2 out
  out=$(mktemp)
  # shellcheck disable=SC2086
  "$b" up $ARGS --gateways 5 --devices "$N" --rate "$RATE" --ramp 1000 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1 &
  local up=$!
  until grep -Eq "connected +$N/$N" "$out"; do
    kill -0 "$up" 2>/dev/null || { echo "$b: up ended before connecting"; cat "$out"; return 1; }
    sleep 1
  done
  sleep 3
  local proxy
  proxy=$(pgrep -P "$up" -f " proxy --listen")
  local rec="" data=""
  if [ -n "${PERF_DIR:-}" ]; then
    data="$PERF_DIR/perf.$(basename "$b").termlink.$rep.data"
    perf record -q -e cpu-clock -F 10000 -p "$proxy" -o "$data" >/dev/null 2>&1 &
    rec=$!
  fi
  read -r u0 s0 <<< "$(cpu_of "$proxy")"
  sleep "$WINDOW"
  read -r u1 s1 <<< "$(cpu_of "$proxy")"
  if [ -n "$rec" ]; then
    kill -INT "$rec"; wait "$rec" 2>/dev/null
    echo $(( N * RATE * WINDOW )) > "${data%.data}.conns"
  fi
  kill -INT "$up"; wait "$up" 2>/dev/null
  rm -f "$out"
  local msgs=$(( N * RATE * WINDOW ))
  awk -v b="$b" -v u=$((u1 - u0)) -v s=$((s1 - s0)) -v t="$ticks" -v m="$msgs" -v w="$WINDOW" 'BEGIN {
    printf "%s: proxy %.3f cores (user %.3f, system %.3f) over %d s; %.1f µs per message (user %.1f)\n",
      b, (u + s) / t / w, u / t / w, s / t / w, w, (u + s) / t / m * 1e6, u / t / m * 1e6 }'
}
lscpu | grep "Model name"
echo "${VARIANT:-link}: $N devices, $RATE DATA/s each, $WINDOW s window, $REPS runs of each, interleaved"
[ -z "${PERF_DIR:-}" ] || mkdir -p "$PERF_DIR"
for rep in $(seq 0 $((REPS - 1))); do
  for b in "$@"; do run "$b" "$rep"; done
done
