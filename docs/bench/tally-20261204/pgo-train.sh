#!/bin/bash
# Training runs for PGO: the bench's TCP scenarios and the stack's fleets in each mode.
set -u
W=$1
cd /work/main
python3 bench/peer_bench.py --runs 1 --seconds 3 --scenarios conn,tls,tlsterm,rr,bulk1,tlsbulk --proxies wasmbed --wasmbed "$W" --out /tmp/pgo-train-pb > /tmp/pgo-train-pb.log 2>&1; echo "peer_bench: $?"
for args in "" "--mode terminate" "--mode terminate --upstream link" "--mode terminate --transport quic"; do
  timeout 300 "$W" up --scenario failover --devices 100 $args > /tmp/pgo-train-up.log 2>&1; echo "up $args: $?"
done
