#!/bin/bash
# Terminate-mode moves at 9,000 devices over 5 gateways (issue 9's benchmark). Release build;
# run from the repository root: bash docs/bench/terminate-9000.sh
set -u
B=./target/release/wasmbed
run() { # name, then up's arguments
  local name=$1; shift
  timeout 600 $B up --mode terminate --gateways 5 --devices 9000 --rate 1 --ramp 1000 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > docs/bench/terminate-$name-9000.txt 2>&1
  grep -E "spread (before|after)|moved|rebalanced|handshakes|disconnect|checks|FAILED" docs/bench/terminate-$name-9000.txt
}
lscpu | grep "Model name"
run failover --scenario failover
run failover-plain-link --scenario failover --plain-link
run drain --scenario drain
run scale-up --scenario scale-up
