#!/bin/bash
# Terminate mode at 9,000 devices over 5 gateways: a gateway killed, its sessions moved over
# the multiplexed QUIC link (--upstream link) and, interleaved in the same session, over
# per-session TLS connections; then a drain and a scale-up over the link.
# Release build; run from the repository root: bash docs/bench/link-9000.sh
set -u
B=./target/release/wasmbed
run() { # name, then up's arguments
  local name=$1; shift
  timeout 600 $B up --mode terminate --gateways 5 --devices 9000 --rate 1 --ramp 1000 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > docs/bench/terminate-$name-9000.txt 2>&1
  echo "== $name"
  grep -E "spread (before|after)|moved|rebalanced|handshakes|disconnect|checks|FAILED" docs/bench/terminate-$name-9000.txt
}
lscpu | grep "Model name"
run failover-link-1 --scenario failover --upstream link
run failover-tcp --scenario failover
run failover-link-2 --scenario failover --upstream link
run drain-link --scenario drain --upstream link
run scale-up-link --scenario scale-up --upstream link
