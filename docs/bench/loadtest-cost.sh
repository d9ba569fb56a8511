#!/bin/bash
# What the fleet simulator itself costs, before and after a change to it: one stack (3 TLS
# gateways, a passthrough proxy, from AFTER_BIN), then `wasmbed loadtest --devices 9000 --rate
# 2 --duration 20s` from each binary in turn (BEFORE, AFTER, BEFORE, AFTER), each measured by
# /usr/bin/time (CPU and peak RSS of the loadtest process alone).
# Usage, from the repository root: bash docs/bench/loadtest-cost.sh BEFORE_BIN [AFTER_BIN]
set -eu
BEFORE=$1
AFTER=${2:-$PWD/target/release/wasmbed}
work=$(mktemp -d)
trap 'pkill -P $$ || true; rm -rf "$work"' EXIT
lscpu | grep "Model name"
"$AFTER" certs init --dir "$work/pki" --devices 0 --gateways 3 > /dev/null
ready() { # file: wait for its ready line
  for _ in $(seq 300); do grep -q '^ready' "$1" 2>/dev/null && return 0; sleep 0.1; done
  echo "no ready line in $1" >&2; return 1
}
GW=""
for i in 0 1 2; do
  WASMBED_LOG=warn "$AFTER" gateway --name gw-$i --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
    --apps apps --idle-timeout 10m --tls-cert "$work/pki/gateway-$i.pem" \
    --tls-key "$work/pki/gateway-$i.key" --client-ca "$work/pki/ca.pem" > "$work/gw$i.out" 2>/dev/null &
done
for i in 0 1 2; do
  ready "$work/gw$i.out"
  L=$(grep -o 'listen=[0-9.:]*' "$work/gw$i.out" | cut -d= -f2)
  A=$(grep -o 'admin=[0-9.:]*' "$work/gw$i.out" | cut -d= -f2)
  GW="$GW,gw-$i=$L;health=$A"
done
WASMBED_LOG=warn "$AFTER" proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 --health http \
  --gateway "${GW#,}" > "$work/proxy.out" 2>/dev/null &
ready "$work/proxy.out"
TARGET=$(grep -o 'listen=[0-9.:]*' "$work/proxy.out" | cut -d= -f2)
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then B=$BEFORE; else B=$AFTER; fi
    /usr/bin/time -f "loadtest: %e s elapsed, %U s user, %S s sys, max RSS %M KiB" "$B" loadtest \
      --ca-dir "$work/pki" --target "$TARGET" --devices 9000 --rate 2 --duration 20s \
      > "$work/lt.out" 2> "$work/lt.time" || true
    echo "== $side $round"
    grep -E "connected of|messages|reconnects" "$work/lt.out"
    tail -1 "$work/lt.time"
  done
done
