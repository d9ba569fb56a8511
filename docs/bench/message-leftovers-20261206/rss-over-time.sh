#!/bin/bash
# The proxy's anonymous RSS per session over time, from the moment N devices (terminate mode,
# --upstream link, 5 gateways, RATE DATA/s each, default 0.01) are connected: SAMPLES readings
# (default 10) EVERY seconds apart (default 20), each beside the DATA the fleet had sent by then,
# so that what a session holds once it has carried messages shows apart from just connected.
# Usage: bash rss-over-time.sh BIN N tcp|quic [more `up` arguments]   (from the repository root)
set -u
B=$1; N=$2; T=$3; shift 3
out=/tmp/trim-up.txt; : > $out
$B up --mode terminate --upstream link --transport $T --gateways 5 --devices "$N" --rate ${RATE:-0.01} --ramp "${RAMP:-250}" \
  --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > $out 2>&1 &
up=$!
proxy=""
until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.2; done
sleep 1
base=$(grep RssAnon /proc/$proxy/status | awk '{print $2}')
until grep -Eq "connected +$N/$N" "$out"; do sleep 1; done
echo "$B $T N=$N rate=${RATE:-0.01}: anon before fleet $base KiB"
for i in $(seq 1 ${SAMPLES:-10}); do
  sleep ${EVERY:-20}
  rss=$(grep RssAnon /proc/$proxy/status | awk '{print $2}')
  echo "t+$(( i * ${EVERY:-20} )) s: anon $rss KiB, $(( (rss - base) * 1024 / N )) B/session; $(grep -E 'connected' $out | tail -1 | grep -oE 'sent [0-9]+ answered [0-9]+')"
done
kill -INT "$up"; wait "$up" 2>/dev/null
