#!/bin/bash
# The proxy's anonymous RSS per session over time, from the moment N devices (terminate mode,
# --upstream link or UPSTREAM, 5 gateways, RATE DATA/s each, default 0.01) are connected: SAMPLES readings
# (default 10) EVERY seconds apart (default 20), each beside the DATA the fleet had sent by then,
# so that what a session holds once it has carried messages shows apart from just connected.
# COUNTERS=1 adds the proxy's own counters (connections, tickets, links, moves) to each line
# (the long QUIC run: `COUNTERS=1 SAMPLES=24 EVERY=25 bash rss-over-time.sh BIN 9000 quic`).
# Usage: bash rss-over-time.sh BIN N tcp|quic [more `up` arguments]   (from the repository root)
set -u
# shellcheck source=bench/common.sh
. bench/common.sh
B=$1; N=$2; T=$3; shift 3
out=/tmp/trim-up.txt; : > $out
$B up --mode terminate --upstream "${UPSTREAM:-link}" --transport $T --gateways 5 --devices "$N" --rate ${RATE:-0.01} --ramp "${RAMP:-250}" \
  --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > $out 2>&1 &
up=$!
proxy=""
until [ -n "$proxy" ]; do proxy=$(pgrep -P "$up" -f " proxy --listen"); sleep 0.05; done
# The base is the proxy's last reading before its first device connection: the fleet starts
# as soon as the proxy is ready, and a reading a second later already held a few hundred
# sessions (about 290 B per session at 9,000, in the runs before this check).
admin=$(proxy_admin "$proxy")
base=$(rss_before_first_connection "$proxy" "$admin" RssAnon)
[ -n "$base" ] || { echo "no reading before the first connection" >&2; kill -INT "$up"; exit 1; }
until grep -Eq "connected +$N/$N" "$out"; do sleep 1; done
[ "${COUNTERS:-0}" = 1 ] || admin=""
echo "$B $T N=$N rate=${RATE:-0.01}: anon before fleet $base KiB${admin:+; admin $admin}"
for i in $(seq 1 ${SAMPLES:-10}); do
  sleep ${EVERY:-20}
  rss=$(grep RssAnon /proc/$proxy/status | awk '{print $2}')
  m=""
  if [ -n "$admin" ]; then
    m=" | $(curl -s -m2 "http://$admin/metrics" | grep -E '^wasmbed_proxy_(connections_open\{transport="(tcp|quic)"|quic_connections_total|links_total|session_moves_total|tls_tickets_total|connections_closed)' | tr '\n' ' ' | cut -c1-600)"
  fi
  echo "t+$(( i * ${EVERY:-20} )) s: anon $rss KiB, $(( (rss - base) * 1024 / N )) B/session; $(grep -E 'connected' $out | tail -1 | grep -oE 'sent [0-9]+ answered [0-9]+')$m"
done
kill -INT "$up"; wait "$up" 2>/dev/null
