#!/bin/bash
# A reconnect storm at 9,000 devices through the terminating proxy: every device drops its
# connection at once and reconnects (`up --scenario storm`), with the handshake admission
# guard at its default (`--max-handshakes 512`) and effectively off (1,000,000), over TLS on
# TCP and over QUIC; interleaved in one session. Usage, from the repository root:
#   bash docs/bench/storm.sh [BIN]
set -u
B=${1:-./target/release/wasmbed}
N=${DEVICES:-9000}
lscpu | grep "Model name"
for transport in tcp quic; do
  for cap in 512 1000000; do
    out=docs/bench/storm-$transport-cap$cap-$(date +%Y%m%d).txt
    timeout 900 "$B" up --mode terminate --transport $transport --gateways 5 --devices "$N" \
      --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
      --proxy-arg=--max-handshakes --proxy-arg=$cap > "$out" 2>&1
    echo "== $transport, max-handshakes $cap (exit $?)"
    grep -E "^(storm|back|handshakes|gateways marked|messages:|FAILED|all checks)" "$out"
  done
done
