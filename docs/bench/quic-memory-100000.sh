#!/bin/bash
# Usage: bash docs/bench/quic-memory-100000.sh BIN [BIN...] (release builds; run from the repository root)
# Proxy RSS at 100,000 idle QUIC devices (--transport quic --upstream link, 5 gateways), one
# run per binary: before the fleet, and once all are connected. Host settings (as root):
#   sysctl -w vm.max_map_count=262144 net.core.rmem_max=16777216 net.core.wmem_max=16777216
set -u
N=${DEVICES:-100000}
lscpu | grep "Model name"
for B in "$@"; do
  out=/tmp/q100k.txt
  : > $out
  $B up --mode terminate --upstream link --transport quic --gateways 5 --devices "$N" \
    --rate 0.01 --ramp "${RAMP:-300}" --listen 127.0.0.1:0 --admin 127.0.0.1:0 > $out 2>&1 &
  up=$!
  proxy=""
  until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.2; done
  sleep 1
  base=$(grep VmRSS /proc/$proxy/status | awk '{print $2}')
  start=$(date +%s)
  until grep -Eq "connected +$N/$N" "$out"; do
    sleep 2
    if [ $(( $(date +%s) - start )) -gt "${TIMEOUT:-1200}" ]; then echo "$B: not all connected in ${TIMEOUT:-1200} s: $(grep connected $out | tail -1)"; break; fi
  done
  sleep 5
  rss=$(grep VmRSS /proc/$proxy/status | awk '{print $2}')
  echo "$B: proxy RSS $base KiB before the fleet, $rss KiB at $N idle QUIC sessions: $(( (rss - base) * 1024 / N )) bytes per session (all in), connected after $(( $(date +%s) - start )) s; $(grep -E 'connected' $out | tail -1 | cut -c1-120)"
  kill -INT "$up"; wait "$up" 2>/dev/null
  sleep 5
done
