#!/bin/bash
# Usage: bash docs/bench/terminate-memory-9000.sh BIN [BIN...] (release builds; run from the repository root)
# Proxy RSS at 9,000 idle terminated TCP sessions (--upstream link), one run per binary.
set -u
for B in "$@"; do
  out=/tmp/f9000.txt
  : > $out
  $B up --mode terminate --upstream link --gateways 5 --devices 9000 --rate 0.01 --ramp 250 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 > $out 2>&1 &
  up=$!
  proxy=""
  until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.2; done
  sleep 1
  base=$(grep VmRSS /proc/$proxy/status | awk '{print $2}')
  until grep -Eq "connected +9000/9000" "$out"; do sleep 1; done
  sleep 3
  rss=$(grep VmRSS /proc/$proxy/status | awk '{print $2}')
  echo "$B: proxy RSS $base KiB before the fleet, $rss KiB at 9,000 idle sessions: $(( (rss - base) * 1024 / 9000 )) bytes per session (all in); $(grep -E 'connected' $out | tail -1)"
  kill -INT "$up"; wait "$up" 2>/dev/null
done
