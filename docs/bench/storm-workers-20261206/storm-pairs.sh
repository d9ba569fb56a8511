#!/bin/bash
# The 9,000-device TLS-over-TCP reconnect storm over the link, two builds interleaved:
# NEW (session workers) and OLD (the build before them), at the default threads (one per core).
# Usage, from the repository root: bash docs/bench/storm-workers-20261206/storm-pairs.sh NEW OLD PAIRS
set -u
NEW=$1; OLD=$2; PAIRS=${3:-2}
D=docs/bench/storm-workers-20261206
lscpu | grep "Model name"
for i in $(seq 1 "$PAIRS"); do
  for tag in new old; do
    if [ $tag = new ]; then B=$NEW; else B=$OLD; fi
    out=$D/storm9k-tcp-link-$tag-$i.txt
    timeout 900 "$B" up --mode terminate --transport tcp --upstream link --gateways 5 --devices 9000 \
      --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1
    echo "== $tag $i (exit $?)"
    grep -E "^(back|handshakes|gateways marked|messages:|FAILED|all checks)" "$out"
  done
done
