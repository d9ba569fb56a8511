#!/bin/bash
# The proxy's CPU per DATA message at a steady rate, terminated TCP (or QUIC: TRANSPORT=quic) over the link (or UPSTREAM=tcp: a TLS connection per session): N devices
# (default 2,000) each sending RATE DATA/s (default 5), the proxy's utime+stime (/proc, all its
# threads) and the fleet's count of answered DATA read at the start and the end of WINDOW
# seconds (default 30) once every device is connected. One run per binary given, in order.
# UP_ARGS: more `up` arguments (e.g. --tls12). TRANSPORT=quic: QUIC devices (default tcp).
# Usage: bash cpu-per-message.sh BIN [BIN...]   (from the repository root)
set -u
N=${DEVICES:-2000} RATE=${RATE:-5} WINDOW=${WINDOW:-30}
tck=$(getconf CLK_TCK)
for B in "$@"; do
  out=/tmp/cpm-up.txt; : > $out
  # shellcheck disable=SC2086 # UP_ARGS is split into arguments
  $B up --mode terminate --upstream "${UPSTREAM:-link}" --transport "${TRANSPORT:-tcp}" --gateways 5 --devices "$N" --rate "$RATE" \
    --ramp 500 --listen 127.0.0.1:0 --admin 127.0.0.1:0 ${UP_ARGS:-} > $out 2>&1 &
  up=$!
  proxy=""
  until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.2; done
  until grep -Eq "connected +$N/$N" "$out"; do sleep 0.5; done
  sleep 5
  cpu() { awk '{print $14 + $15}' /proc/$proxy/stat; }
  answered() { grep -E 'connected' $out | tail -1 | grep -oE 'answered [0-9]+' | awk '{print $2}'; }
  c0=$(cpu); a0=$(answered)
  sleep "$WINDOW"
  c1=$(cpu); a1=$(answered)
  echo "$B: $(( a1 - a0 )) DATA answered in ${WINDOW} s, proxy CPU $(( c1 - c0 )) ticks: $(( (c1 - c0) * 1000000 / tck / (a1 - a0) )) µs per DATA; $(grep -E 'connected' $out | tail -1 | cut -c1-100)"
  kill -INT "$up"; wait "$up" 2>/dev/null
done
