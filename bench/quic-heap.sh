#!/usr/bin/env bash
# What an idle QUIC device session (or, with TRANSPORT=tcp, a TLS-over-TCP one) holds in the
# proxy's heap, by allocation site: a terminating proxy (`--quic-listen`, `--upstream link` to
# 2 gateways) run under heaptrack, N devices (`wasmbed loadtest`, RATE DATA/s each) connected
# and idle, then
# the proxy SIGKILLed (nothing freed at exit: what heaptrack reports as leaked is what was
# live). Run twice, at SMALL and at LARGE devices, and divide each site's difference by
# LARGE - SMALL: what the process holds whatever the fleet (the links, the runtime, buffers)
# cancels out.
#
#   bench/quic-heap.sh [SMALL [LARGE]]       (defaults 500 and 2000)
#
# TRANSPORT=tcp measures TLS-over-TCP devices on the terminating listener instead
# (LOADTEST_ARGS=--tls12 for TLS 1.2 devices). RATE (DATA/s
# per device, default 0.02) and SETTLE (seconds idle once all are connected, default 5) say
# what "idle" is: with RATE=0.5 SETTLE=20 every session has carried ten or more messages and
# their answers and checkpoints before the proxy is killed; with RATE=0.0001 almost none has.
#
# Needs target/release/wasmbed (or WASMBED=PATH), heaptrack, curl. glibc's malloc is the
# proxy's default allocator, which is what heaptrack sees. Loopback only; ports are the
# kernel's. Prints a table of bytes per session by site (sites of 48 B/session or more, the
# rest summed), and keeps the raw heaptrack files in OUT (default target/quic-heap).
set -euo pipefail
B=${WASMBED:-$(cd "$(dirname "$0")/.." && pwd)/target/release/wasmbed}
SMALL=${1:-500} LARGE=${2:-2000}
TRANSPORT=${TRANSPORT:-quic} RATE=${RATE:-0.02} SETTLE=${SETTLE:-5}
case "$TRANSPORT" in quic | tcp) ;; *) echo "TRANSPORT is quic or tcp" >&2; exit 2 ;; esac
OUT=${OUT:-$(cd "$(dirname "$0")/.." && pwd)/target/quic-heap}
command -v heaptrack >/dev/null || { echo "needs heaptrack" >&2; exit 2; }
mkdir -p "$OUT"
# shellcheck source=bench/common.sh
. "$(dirname "$0")/common.sh"
bench_setup "$LARGE"
link_gateways $((LARGE + 64))
lscpu | grep "Model name"
for n in "$SMALL" "$LARGE"; do
  file=$OUT/proxy-$n
  rm -f "$file".*
  heaptrack -o "$file" "$B" proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 \
    --quic-listen 127.0.0.1:0 --mode terminate \
    --tls-cert "$D/proxy.pem" --tls-key "$D/proxy.key" --client-ca "$D/ca.pem" \
    --upstream-ca "$D/ca.pem" --upstream-cert "$D/proxy-client.pem" \
    --upstream-key "$D/proxy-client.key" --upstream link --upstream-server-name localhost \
    --health http --health-path /readyz --max-connections $((LARGE + 64)) \
    "${GWS[@]}" >"$W/proxy.out" 2>"$W/proxy.err" &
  HT=$!
  PIDS+=("$HT")
  wait_ready "$W/proxy.out"
  line=$(grep '^ready' "$W/proxy.out")
  PA=$(field admin "$line") PQ=$(field quic "$line") PT=$(field listen "$line")
  TARGET=$PQ
  [ "$TRANSPORT" = tcp ] && TARGET=$PT
  # Anchored: heaptrack's own wrapper script carries the same command line after its own.
  PROXY=$(pgrep -f -- "^$B proxy --listen 127.0.0.1:0 --admin 127.0.0.1:0 --quic-listen" | tail -1)
  "$B" loadtest --target "$TARGET" --transport "$TRANSPORT" --devices "$n" --ramp 100 --rate "$RATE" \
    --duration 600s --app echo --sni localhost --ca-dir "$D" --devices-from "$D" \
    ${LOADTEST_ARGS:-} >"$W/loadtest.out" 2>&1 &
  LT=$!
  PIDS+=("$LT")
  open=0
  for _ in $(seq 1 ${WAIT_TICKS:-1200}); do
    open=$(curl -s "http://$PA/metrics" | awk -v t="$TRANSPORT" '$1 == "wasmbed_proxy_connections_open{transport=\"" t "\"}" {print $2}')
    [ "${open%.*}" = "$n" ] && break
    sleep 0.25
  done
  if [ "${open%.*}" != "$n" ]; then
    echo "only ${open:-0} of $n devices connected" >&2
    for f in loadtest.out proxy.err gateways.err; do echo "== $f"; tail -n 5 "$W/$f"; done >&2
    curl -s "http://$PA/metrics" | grep -E "open|refused|rejected" | head >&2
    exit 1
  fi
  sleep "$SETTLE" # the handshakes' leftovers freed, the sessions idle (or carrying RATE)
  echo "$n devices connected; proxy RSS $(awk '/VmRSS/{print $2}' "/proc/$PROXY/status") KiB"
  kill -KILL "$PROXY"
  wait "$HT" 2>/dev/null || true
  kill "$LT" 2>/dev/null || true
  wait "$LT" 2>/dev/null || true
  # Live bytes by stack (a flame-graph file: frames root first, the leaked bytes last).
  heaptrack_print -f "$(ls "$file".zst "$file".gz 2>/dev/null | head -1)" -p 0 -a 0 -T 0 \
    -F "$file.leaked.txt" --flamegraph-cost-type leaked >/dev/null 2>&1
done
python3 "$(dirname "$0")/heap_by_site.py" "$OUT/proxy-$SMALL.leaked.txt" "$OUT/proxy-$LARGE.leaked.txt" \
  "$((LARGE - SMALL))"
