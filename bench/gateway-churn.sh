#!/usr/bin/env bash
# Gateway churn, the proxy's memory per gateway identity: a terminating proxy (`--upstream
# link`), DEV devices sending 2 DATA/s (`wasmbed loadtest`), and ROUNDS rounds in which a new
# gateway process joins under a new name and address (`POST /api/gateways`), the previous one
# leaves (`DELETE`, its sessions move) and is killed. After each round: the proxy's RSS and
# its number of /metrics series. What the soak's events do, one kind at a time and faster.
#
#   bench/gateway-churn.sh ROUNDS [PREFIX...]
#   STEP=3 DEV=200 bench/gateway-churn.sh 20                           # 3 s a round
#   STEP=3 ENDSIG=KILL bench/gateway-churn.sh 20 heaptrack -o /tmp/h20 # the proxy's live
#                                       # heap at the end (KILL: nothing freed at exit)
#
# Needs target/release/wasmbed (or WASMBED=PATH), curl. Loopback only; ports are the
# kernel's choice. Writes into a temporary directory, removed at the end.
set -euo pipefail
B=${WASMBED:-$(cd "$(dirname "$0")/.." && pwd)/target/release/wasmbed}
N=${1:?usage: gateway-churn.sh ROUNDS [PREFIX...]}
shift
STEP=${STEP:-3} DEV=${DEV:-200} ENDSIG=${ENDSIG:-TERM}
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
bench_setup "$DEV"
# Starts gateway $1; sets GW_PID, GW_LISTEN, GW_ADMIN.
gateway() {
  "$B" gateway --name "$1" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --apps "$D/apps" \
    --session-keys "$D/session-keys.toml" --tls-cert "$D/gateway-0.pem" \
    --tls-key "$D/gateway-0.key" --client-ca "$D/ca.pem" --proxy-identity wasmbed-proxy \
    --link >"$W/$1.out" 2>>"$W/gateways.err" &
  GW_PID=$!
  PIDS+=("$GW_PID")
  until grep -q '^ready' "$W/$1.out" 2>/dev/null; do sleep 0.05; done
  local line; line=$(head -1 "$W/$1.out")
  GW_LISTEN=$(field listen "$line") GW_ADMIN=$(field admin "$line")
}
gateway g0
"$@" "$B" proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 --mode terminate \
  --tls-cert "$D/proxy.pem" --tls-key "$D/proxy.key" --client-ca "$D/ca.pem" \
  --upstream-ca "$D/ca.pem" --upstream-cert "$D/proxy-client.pem" \
  --upstream-key "$D/proxy-client.key" --upstream link --upstream-server-name localhost \
  --health http --health-path /readyz --health-interval 250ms --health-timeout 200ms \
  --gateway "g0=$GW_LISTEN;health=$GW_ADMIN" >"$W/proxy.out" 2>"$W/proxy.err" &
PIDS+=($!)
until grep -q '^ready' "$W/proxy.out" 2>/dev/null; do sleep 0.05; done
line=$(grep '^ready' "$W/proxy.out")
PA=$(field admin "$line") PL=$(field listen "$line")
PROXY=$(pgrep -f -- "$B proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 --mode terminate" | tail -1)
"$B" loadtest --target "$PL" --devices "$DEV" --rate 2 --duration "$((N * STEP + 15))s" \
  --app echo --sni localhost --ca-dir "$D" --devices-from "$D" >"$W/loadtest.out" 2>&1 &
LT=$!
PIDS+=("$LT")
sleep 8 # the fleet connects (the loadtest has no ready line)
prev=g0 prevpid=$GW_PID
for i in $(seq 1 "$N"); do
  gateway "g$i"
  curl -sf -o /dev/null -X POST "http://$PA/api/gateways" -H 'content-type: application/json' \
    -d "{\"name\":\"g$i\",\"address\":\"$GW_LISTEN\",\"health_address\":\"$GW_ADMIN\"}"
  curl -sf -o /dev/null -X DELETE "http://$PA/api/gateways/$prev"
  kill -9 "$prevpid"
  wait "$prevpid" 2>/dev/null || true
  sleep "$STEP"
  prev=g$i prevpid=$GW_PID
  echo "round $i rss_kib $(awk '/VmRSS/{print $2}' "/proc/$PROXY/status") series $(curl -s "http://$PA/metrics" | grep -vc '^#')"
done
wait "$LT" || true
grep -E '^(devices|messages|reconnects)' "$W/loadtest.out"
sleep 2
kill "-$ENDSIG" "$PROXY"
wait 2>/dev/null || true
