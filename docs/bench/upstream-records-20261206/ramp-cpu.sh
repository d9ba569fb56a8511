#!/bin/bash
# The proxy's CPU per new session with a TLS connection per session to its gateway (`--upstream
# tcp`, `[upstream_tls]`): N devices (default 3,000) connecting at RAMP a second (default 500),
# the proxy's utime+stime (/proc, all threads) from its start to the moment every device is
# connected, divided by N: a device's TLS handshake, the proxy's to the gateway (full or resumed
# from the gateway's tickets), the HELLO and WELCOME. One run per binary given, in order.
# Usage: bash ramp-cpu.sh BIN [BIN...]   (from the repository root)
set -u
# shellcheck source=bench/common.sh
. bench/common.sh
N=${DEVICES:-3000} RAMP=${RAMP:-500}
tck=$(getconf CLK_TCK)
for B in "$@"; do
  out=/tmp/ramp-up.txt; : > $out
  $B up --mode terminate --upstream tcp --transport tcp --gateways 5 --devices "$N" --rate 0.01 \
    --ramp "$RAMP" --listen 127.0.0.1:0 --admin 127.0.0.1:0 > $out 2>&1 &
  up=$!
  proxy=""
  until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.05; done
  until grep -Eq "connected +$N/$N" "$out"; do sleep 0.2; done
  c=$(awk '{print $14 + $15}' /proc/$proxy/stat)
  admin=$(proxy_admin "$proxy")
  hs=$(curl -s -m2 "http://$admin/metrics" | grep '^wasmbed_proxy_upstream_handshakes_total' | tr '\n' ' ')
  echo "$B: $N sessions, proxy CPU $c ticks from its start: $(( c * 1000000 / tck / N )) µs per session; $hs"
  kill -INT "$up"; wait "$up" 2>/dev/null
done
