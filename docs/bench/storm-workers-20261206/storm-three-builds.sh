#!/bin/bash
set -u
D=docs/bench/storm-workers-20261206
for i in 1 2; do
  for pair in "accmain:/tmp/accmain23" "new:/tmp/base23" "old:/tmp/new21"; do
    tag=${pair%%:*}; B=${pair#*:}
    out=$D/storm9k-tcp-link-$tag-r$i.txt
    timeout 900 "$B" up --mode terminate --transport tcp --upstream link --gateways 5 --devices 9000 \
      --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1
    echo "== $tag r$i (exit $?)"
    grep -E "^(back|handshakes|gateways marked|all checks)" "$out"
  done
done
