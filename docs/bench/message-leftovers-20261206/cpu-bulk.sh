#!/usr/bin/env bash
# The proxy's CPU per DATA for devices sending large DATA: a terminating proxy (TLS over TCP,
# `--upstream link` to 2 gateways running the echo app), DEVICES devices (default 50) each
# sending RATE DATA/s (default 100) of PAYLOAD bytes (default 8192) through `wasmbed loadtest`
# for 45 s; the proxy's utime + stime (/proc, all threads) over WINDOW s (default 30) from
# 10 s in, divided by the DATA answered in that window (the fleet's summary gives its total;
# the offered load is fixed, so the window's count is RATE x DEVICES x WINDOW when all is
# answered). One run per binary given, in order.
# Usage: bash cpu-bulk.sh BIN [BIN...]   (from the repository root)
set -euo pipefail
N=${DEVICES:-50} RATE=${RATE:-100} PAYLOAD=${PAYLOAD:-8192} WINDOW=${WINDOW:-30}
tck=$(getconf CLK_TCK)
lscpu | grep "Model name"
for B in "$@"; do
  # shellcheck source=bench/common.sh
  . bench/common.sh
  bench_setup "$N"
  link_gateways $((N + 64))
"$B" proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 --mode terminate \
    --tls-cert "$D/proxy.pem" --tls-key "$D/proxy.key" --client-ca "$D/ca.pem" \
    --upstream-ca "$D/ca.pem" --upstream-cert "$D/proxy-client.pem" \
    --upstream-key "$D/proxy-client.key" --upstream link --upstream-server-name localhost \
    --health http --health-path /readyz "${GWS[@]}" >"$W/proxy.out" 2>"$W/proxy.err" &
  PROXY=$!
  PIDS+=("$PROXY")
  wait_ready "$W/proxy.out"
  PT=$(field listen "$(grep '^ready' "$W/proxy.out")")
  "$B" loadtest --target "$PT" --transport tcp --devices "$N" --ramp 100 --rate "$RATE" \
    --payload "$PAYLOAD" --duration 45s --app echo --sni localhost --ca-dir "$D" \
    --devices-from "$D" >"$W/loadtest.out" 2>&1 &
  LT=$!
  PIDS+=("$LT")
  sleep 10
  c0=$(awk '{print $14 + $15}' "/proc/$PROXY/stat")
  sleep "$WINDOW"
  c1=$(awk '{print $14 + $15}' "/proc/$PROXY/stat")
  wait "$LT" || true
  want=$((N * RATE * WINDOW))
  echo "$B: proxy CPU $((c1 - c0)) ticks over ${WINDOW} s at ${N}x${RATE} DATA/s of ${PAYLOAD} B: $(( (c1 - c0) * 1000000 / tck / want )) µs per DATA offered; $(grep -iE 'answered|sent|lost|error' "$W/loadtest.out" | tail -3 | tr '\n' ' ')"
  kill -9 "${PIDS[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  rm -rf "$W"
  trap - EXIT
done
