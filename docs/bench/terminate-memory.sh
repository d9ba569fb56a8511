#!/bin/bash
# Proxy memory per idle session: `wasmbed up` with N devices (one DATA per 100 s each), the
# proxy's RSS once all are connected; per session = difference between N=1000 and N=4000 / 3000.
# Release build; run from the repository root: bash docs/bench/terminate-memory.sh
set -u
B=./target/release/wasmbed
measure() { # mode, devices
  local mode=$1 n=$2 out=/tmp/mem-$1-$2.txt
  $B up --mode "$mode" ${UP_ARGS:-} --gateways 5 --devices "$n" --rate 0.01 --ramp 2000 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1 &
  local up=$!
  until grep -Eq "connected +$n/$n" "$out"; do sleep 1; done
  sleep 3
  local proxy
  proxy=$(pgrep -P "$up" -f "wasmbed proxy")
  grep VmRSS "/proc/$proxy/status" | awk '{print $2}'
  kill -INT "$up"; wait "$up" 2>/dev/null
}
lscpu | grep "Model name"
for mode in ${MODES:-terminate passthrough}; do
  a=$(measure $mode 1000); b=$(measure $mode 4000)
  echo "$mode: proxy RSS $a KiB at 1000 sessions, $b KiB at 4000: $(( (b - a) * 1024 / 3000 )) bytes per idle session"
done
