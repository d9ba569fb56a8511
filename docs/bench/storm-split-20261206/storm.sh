#!/bin/bash
# The 9,000-device TLS-over-TCP reconnect storm over the link, builds interleaved, each run with
# `perf stat` on the proxy process (its context switches and CPU, from its start to its end).
# Usage, from the repository root:
#   bash docs/bench/storm-split-20261206/storm.sh ROUNDS tag:BIN[:FLAGS] [tag:BIN[:FLAGS] ...]
# FLAGS (optional, added 2026-12-06 later): more of up's flags for that build's runs, e.g.
# `lanes-gw1:/tmp/b:--gateway-arg=--threads=1` (split at spaces).
# Another mode: KIND=NAME UP="up's mode flags" (default: KIND=tcp-link, terminate over the link).
set -u
KIND=${KIND:-tcp-link}
UP=${UP:---mode terminate --transport tcp --upstream link}
ROUNDS=$1; shift
D=${D:-docs/bench/storm-split-20261206}
lscpu | grep "Model name"
if pgrep -f " proxy " >/dev/null; then
  echo "a proxy is already running: perf would attach to the wrong one"; pgrep -af " proxy "; exit 1
fi
for i in $(seq 1 "$ROUNDS"); do
  for pair in "$@"; do
    tag=${pair%%:*}; rest=${pair#*:}
    B=${rest%%:*}; FLAGS=""
    [ "$rest" != "$B" ] && FLAGS=${rest#*:}
    out=$D/storm9k-$KIND-$tag-$i.txt
    # shellcheck disable=SC2086
    timeout 900 "$B" up $UP $FLAGS --gateways 5 --devices 9000 \
      --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1 &
    up=$!
    pid=""
    for _ in $(seq 1 400); do
      # The proxy: `up` runs its own binary as `BIN proxy ...` (none other runs: checked above).
      pid=$(pgrep -n -f "^$B proxy" || true)
      [ -n "$pid" ] && break
      sleep 0.05
    done
    [ -n "$pid" ] || { echo "no proxy found for $tag $i"; wait $up; continue; }
    perf stat -e context-switches,cpu-migrations,task-clock -p "$pid" -o "$out.perfstat" &
    ps=$!
    wait $up; code=$?
    kill -INT $ps 2>/dev/null; wait $ps 2>/dev/null
    echo "== $tag $i (exit $code) proxy pid $pid"
    grep -E "^(back|gateways marked|over the storm|FAILED|all checks)" "$out"
    grep -E "context-switches|task-clock" "$out.perfstat"
  done
done
