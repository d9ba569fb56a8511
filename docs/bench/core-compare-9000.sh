#!/bin/bash
# The session-core change side by side with the build before it: terminate mode at 9,000
# devices over 5 gateways, a gateway killed, sessions moved over the link; the two binaries
# interleaved (before, after, before, after) in one session on one host.
# Usage, from the repository root: bash docs/bench/core-compare-9000.sh BEFORE_BIN [AFTER_BIN]
set -u
BEFORE=$1
AFTER=${2:-./target/release/wasmbed}
lscpu | grep "Model name"
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then B=$BEFORE; else B=$AFTER; fi
    out=docs/bench/core-compare-$side-$round-9000${SUFFIX:-}.txt
    timeout 600 $B up --mode terminate --upstream link --gateways 5 --devices 9000 --rate 1 \
      --ramp 1000 --scenario failover --listen 127.0.0.1:0 --admin 127.0.0.1:0 > $out 2>&1
    echo "== $side $round (exit $?)"
    grep -E "spread (before|after)|moved|disconnect|messages|state|checks|FAILED" $out
  done
done
