#!/usr/bin/env bash
# The proxy tier's own events under load, as `wasmbed up` measures them (the fleet's side
# and the proxy's), each scenario's JSON kept beside its output.
#
# Usage: docs/bench/proxy-tier.sh BIN OUT_DIR WHAT [DEVICES] [ROUNDS]
#   WHAT: link-kill   a gateway SIGKILLed under the link, with the liveness watch and without
#                     (--no-liveness-watch), interleaved ROUNDS times (default 3), 20 DATA/s
#         restart     two terminating proxies (link), one SIGTERMed (sessions handed back)
#                     and a new one started, 2 DATA/s
#         upgrade     the passthrough proxy upgraded in place (--takeover), 2 DATA/s
#   DEVICES: default 300 (link-kill) or 9000. RATE (environment): DATA per second per device
#   for link-kill, default 20 (use 2 at 9,000 devices: 20 would be 180,000 DATA/s);
#   GATEWAYS (environment): default 3.
set -euo pipefail
bin="$1"; out="$2"; what="$3"
mkdir -p "$out"
common=(--listen 127.0.0.1:0 --admin 127.0.0.1:0 --gateways "${GATEWAYS:-3}")
run() { # NAME ARGS...: one scenario, its output and JSON in OUT_DIR
  local name="$1"; shift
  WASMBED_LOG=error "$bin" up "${common[@]}" --json "$out/$name.json" "$@" >"$out/$name.txt" 2>&1 || true
  grep -E "marked down|moved |longest|gone after|saw a disconnect|re-home p50|messages:|FAILED|all checks" "$out/$name.txt" | sed "s/^/$name: /"
}
case "$what" in
  link-kill)
    devices="${4:-300}"; rounds="${5:-3}"
    for r in $(seq 1 "$rounds"); do
      run "link-kill-watch-$r" --mode terminate --upstream link --scenario failover --devices "$devices" --rate "${RATE:-20}"
      run "link-kill-probes-$r" --mode terminate --upstream link --scenario failover --devices "$devices" --rate "${RATE:-20}" --proxy-arg=--no-liveness-watch
    done ;;
  restart)
    devices="${4:-9000}"
    run "restart-$devices" --mode terminate --upstream link --proxies 2 --scenario proxy-restart --devices "$devices" --rate 2 ;;
  upgrade)
    devices="${4:-9000}"
    run "upgrade-$devices" --scenario proxy-upgrade --devices "$devices" --rate 2 ;;
  *) echo "WHAT: link-kill | restart | upgrade" >&2; exit 2 ;;
esac
