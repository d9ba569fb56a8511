#!/bin/bash
# scrape.sh OUT: every second, the proxy's QUIC counters and open-connection gauges
while true; do
  curl -s -m 1 http://127.0.0.1:9900/metrics 2>/dev/null | grep -E "^wasmbed_proxy_(quic_connections_total|open_connections|connections_open|handshakes_in_progress|handshakes_waiting|sessions_cancelled_total\{cause=\"superseded)" | tr '\n' ' ' | sed "s/^/$(date +%s) /"; echo
  sleep 1
done > $1
