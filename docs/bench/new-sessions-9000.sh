#!/bin/bash
# New terminate-mode sessions at 9,000 devices: per-session TLS upstreams vs the multiplexed
# link, interleaved. 9,000 devices dial at up to 3,000/s; what the fleet reports: how long
# until all were WELCOMEd, and HELLO -> WELCOME latency (which includes the proxy opening the
# session's upstream: a TCP connect and a TLS handshake, or a stream on the link).
# Release build; run from the repository root: bash docs/bench/new-sessions-9000.sh
set -u
B=./target/release/wasmbed
run() { # name, then up's arguments
  local name=$1; shift
  local out=/tmp/new-sessions-$name.txt
  timeout 600 $B up --mode terminate --gateways 5 --devices 9000 --rate 0.1 --ramp 3000 \
    --scenario failover --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > "$out" 2>&1
  echo "== $name: $(grep -E '^devices ' "$out")"
  grep -E '^  (handshake|welcome) ' "$out"
}
lscpu | grep "Model name"
for i in 1 2; do
  run "tcp-$i"
  run "link-$i" --upstream link
done
