#!/bin/bash
# rss-over-time.sh for QUIC devices over a longer run, with the proxy's counters (connections,
# tickets, links, moves) beside each reading: SAMPLES readings (default 24) EVERY seconds apart
# (default 25), 0.01 DATA/s per device. Kept as run (its run was stopped at t+325 s).
# Usage: bash quic-rss-long.sh BIN N   (from the repository root)
set -u
B=$1; N=$2
out=/tmp/qlong-up.txt; : > $out
$B up --mode terminate --upstream link --transport quic --gateways 5 --devices "$N" --rate 0.01 --ramp 250 \
  --listen 127.0.0.1:0 --admin 127.0.0.1:0 > $out 2>&1 &
up=$!
proxy=""
until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.2; done
sleep 1
base=$(grep RssAnon /proc/$proxy/status | awk '{print $2}')
until grep -Eq "connected +$N/$N" "$out"; do sleep 1; done
admin=$(ss -ltnpH | grep "pid=$proxy," | awk '{print $4}' | while read a; do curl -s -m1 http://$a/metrics | grep -q wasmbed_proxy && echo $a; done | head -1)
echo "$B quic N=$N: anon before fleet $base KiB; admin $admin"
for i in $(seq 1 ${SAMPLES:-24}); do
  sleep ${EVERY:-25}
  rss=$(grep RssAnon /proc/$proxy/status | awk '{print $2}')
  m=$(curl -s -m2 http://$admin/metrics | grep -E '^wasmbed_proxy_(connections_open\{transport="quic"|quic_connections_total|links_total|session_moves_total|tls_tickets_total|connections_closed)' | tr '\n' ' ' | cut -c1-600)
  echo "t+$(( i * ${EVERY:-25} )) s: anon $rss KiB, $(( (rss - base) * 1024 / N )) B/session; $(grep -E 'connected' $out | tail -1 | grep -oE 'connected +[0-9]+/[0-9]+|sent [0-9]+ answered [0-9]+|reconnects? [0-9]+' | tr '\n' ' ') | $m"
done
kill -INT "$up"; wait "$up" 2>/dev/null
