#!/bin/bash
# Usage: bash docs/bench/terminate-memory-9000.sh BIN [BIN...] (release builds; run from the repository root)
# Proxy RSS at 9,000 idle terminated TCP sessions (--upstream link), one run per binary.
set -u
# shellcheck source=bench/common.sh
. bench/common.sh
for B in "$@"; do
  out=/tmp/f9000.txt
  : > $out
  $B up --mode terminate --upstream link --gateways 5 --devices 9000 --rate 0.01 --ramp 250 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 > $out 2>&1 &
  up=$!
  proxy=""
  until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.05; done
  # The base: the proxy's last reading before its first device connection (until 2026-12-06,
  # a reading a second in, which already held a few hundred sessions).
  admin=$(proxy_admin "$proxy")
  base=$(rss_before_first_connection "$proxy" "$admin" VmRSS)
  [ -n "$base" ] || { echo "$B: no reading before the first connection" >&2; kill -INT "$up"; wait "$up"; continue; }
  until grep -Eq "connected +9000/9000" "$out"; do sleep 1; done
  sleep 3
  rss=$(grep VmRSS /proc/$proxy/status | awk '{print $2}')
  echo "$B: proxy RSS $base KiB before the fleet, $rss KiB at 9,000 idle sessions: $(( (rss - base) * 1024 / 9000 )) bytes per session (all in); $(grep -E 'connected' $out | tail -1)"
  kill -INT "$up"; wait "$up" 2>/dev/null
done
