#!/bin/bash
# The fleet simulator on wasmbed-device (the device SDK) side by side with the build before it
# (its own device loop): `up --scenario failover` in passthrough mode (2,000 devices) and in
# terminate mode over the link (9,000 devices); the two binaries interleaved in one session on
# one host. Usage, from the repository root:
#   bash docs/bench/device-sdk.sh BEFORE_BIN [AFTER_BIN]
set -u
BEFORE=$1
AFTER=${2:-./target/release/wasmbed}
lscpu | grep "Model name"
run() { # mode round side bin args...
  local mode=$1 round=$2 side=$3 bin=$4
  shift 4
  local out=docs/bench/device-sdk-$mode-$side-$round.txt
  timeout 900 "$bin" up "$@" --scenario failover --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1
  echo "== $mode $side $round (exit $?)"
  grep -E "spread (before|after)|re-homed|moved|messages|state|checks|FAILED|devices .*connected" "$out"
}
for round in 1 2 3; do
  for side in before after; do
    if [ $side = before ]; then B=$BEFORE; else B=$AFTER; fi
    run passthrough-2000 $round $side "$B" --mode passthrough --gateways 5 --devices 2000 --rate 2 --ramp 1000
  done
done
for round in 1 2; do
  for side in before after; do
    if [ $side = before ]; then B=$BEFORE; else B=$AFTER; fi
    run terminate-link-9000 $round $side "$B" --mode terminate --upstream link --gateways 5 \
      --devices 9000 --rate 1 --ramp 1000
  done
done
