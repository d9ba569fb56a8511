#!/usr/bin/env bash
# A proxy replica stopped (SIGTERM) or killed (SIGKILL) under load, as the device sees it.
# Two terminating proxies share one port (reuse_port: the local stand-in for two replicas
# behind one Service address), three gateways share a session key ring, a fleet of `counter`
# devices sends DATA; one proxy is signalled mid-run. The fleet's own report says what the
# devices saw: reconnects, DATA lost, apps whose state restarted, re-home percentiles.
#
# Usage: docs/bench/proxy-stop.sh BIN SIGNAL [DEVICES] [RATE]
#   BIN: the wasmbed binary; SIGNAL: TERM or KILL. Prints one line of figures.
set -euo pipefail
bin="$1"; sig="$2"; devices="${3:-60}"; rate="${4:-5}"
work="$(mktemp -d)"
pids=()
cleanup() { for p in "${pids[@]}"; do kill -9 "$p" 2>/dev/null || true; done; rm -rf "$work"; }
trap cleanup EXIT
"$bin" certs init --dir "$work/pki" --devices 0 --gateways 0 >/dev/null
apps="$(cd "$(dirname "$0")/../.." && pwd)/apps"
ready() { # FILE: waits for the ready line, prints it
  for _ in $(seq 1 200); do
    if grep -q '^ready ' "$1" 2>/dev/null; then grep -m1 '^ready ' "$1"; return; fi
    sleep 0.05
  done
  echo "no ready line in $1" >&2; exit 1
}
gw_lines=""
for i in 0 1 2; do
  WASMBED_LOG=warn "$bin" gateway --insecure-plaintext --name "gw-$i" --listen 127.0.0.1:0 \
    --admin off --apps "$apps" --session-keys "$work/pki/session-keys.toml" \
    >"$work/gw-$i.out" 2>/dev/null &
  pids+=($!)
  addr="$(ready "$work/gw-$i.out" | sed 's/.*listen=\([^ ]*\).*/\1/')"
  gw_lines+=$'\n[[gateway]]\n'"name = \"gw-$i\""$'\n'"addr = \"$addr\""
done
port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
for p in a b; do
  cat >"$work/proxy-$p.toml" <<EOF
mode = "terminate"
admin = "127.0.0.1:0"
grace = "10s"
[[listener]]
addr = "127.0.0.1:$port"
reuse_port = true
[health]
check = "tcp"
interval = "200ms"
[tls]
cert = "$work/pki/proxy.pem"
key = "$work/pki/proxy.key"
client_ca = "$work/pki/ca.pem"
$gw_lines
EOF
  WASMBED_LOG="${PROXY_LOG:-warn}" "$bin" proxy --config "$work/proxy-$p.toml" >"$work/proxy-$p.out" 2>"${PROXY_LOG_DIR:-/dev/null}${PROXY_LOG_DIR:+/proxy-$p.log}" &
  pids+=($!)
  ready "$work/proxy-$p.out" >/dev/null
done
victim="${pids[3]}"
"$bin" loadtest --ca-dir "$work/pki" --target "127.0.0.1:$port" --devices "$devices" \
  --rate "$rate" --duration 16s --app counter --json "$work/r.json" >"$work/lt.out" 2>&1 &
lt=$!
sleep 6
signalled="$(date +%s.%N)"
kill "-$sig" "$victim"
# When the process is gone (exited: a zombie until the shell reaps it counts as gone).
( for _ in $(seq 1 800); do
    state="$(awk '{print $3}' "/proc/$victim/stat" 2>/dev/null || echo X)"
    if [ "$state" = Z ] || [ "$state" = X ]; then date +%s.%N >"$work/stopped"; exit 0; fi
    sleep 0.02
  done ) &
wait "$lt" || true
sleep 0.2
stopped="$(cat "$work/stopped" 2>/dev/null || echo 0)"
python3 - "$work/r.json" "$sig" "$signalled" "${stopped:-0}" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
m = r["messages"]
re = r.get("rehome_us") or {}
took = float(sys.argv[4]) - float(sys.argv[3]) if float(sys.argv[4]) else float("nan")
print(f"SIG{sys.argv[2]}: proxy gone after {took:.2f} s; devices {r['connected']}/{r['devices']}, "
      f"reconnects {r['reconnects']}, resumed {r.get('resumed', 0)}, sent {m['sent']}, "
      f"lost {m['lost']}, errors {m['errors']}, state_resets {r.get('state_resets', 0)}, "
      f"re-home p50 {re.get('p50', 0)/1000:.0f} ms p99 {re.get('p99', 0)/1000:.0f} ms max {re.get('max', 0)/1000:.0f} ms")
PY
