# Shared by the bench scripts that start their own processes (source it after setting B):
# a temporary directory W (removed at exit, every PID in PIDS killed), a PKI in D for
# DEVICES devices and one gateway identity, the echo app in D/apps, and `field NAME LINE`,
# which reads NAME=VALUE out of a process's `ready ...` line; `wait_ready FILE` waits for that
# line, and `link_gateways MAX_SESSIONS` starts two link gateways (g0, g1) running the echo
# app, their `--gateway` flags for a proxy in GWS. `proxy_admin PID` prints the admin
# address of the proxy PID once it answers; `rss_before_first_connection PID ADMIN FIELD`
# prints its /proc status FIELD (VmRSS, RssAnon) as last read before it counted a connection.
bench_setup() {
  W=$(mktemp -d)
  PIDS=()
  trap 'kill -9 "${PIDS[@]}" 2>/dev/null || true; rm -rf "$W"' EXIT
  D=$W/pki
  "$B" certs init --dir "$D" --devices "$1" --gateways 1 >/dev/null
  mkdir -p "$D/apps"
  cp "$(dirname "${BASH_SOURCE[0]}")/../apps/echo.wat" "$D/apps/"
}
field() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" <<<"$2" | head -1; }
wait_ready() { until grep -q '^ready' "$1" 2>/dev/null; do sleep 0.05; done; }
link_gateways() {
  GWS=()
  local g line
  for g in g0 g1; do
    "$B" gateway --name "$g" --listen 127.0.0.1:0 --admin 127.0.0.1:0 --apps "$D/apps" \
      --session-keys "$D/session-keys.toml" --tls-cert "$D/gateway-0.pem" \
      --tls-key "$D/gateway-0.key" --client-ca "$D/ca.pem" --proxy-identity wasmbed-proxy \
      --max-sessions "$1" --link >"$W/$g.out" 2>>"$W/gateways.err" &
    PIDS+=($!)
    wait_ready "$W/$g.out"
    line=$(head -1 "$W/$g.out")
    GWS+=(--gateway "$g=$(field listen "$line");health=$(field admin "$line")")
  done
}
proxy_admin() {
  local admin=""
  until [ -n "$admin" ]; do
    admin=$(ss -ltnpH | grep "pid=$1," | awk '{print $4}' | while read -r a; do curl -s -m1 "http://$a/metrics" | grep -q wasmbed_proxy && echo "$a"; done | head -1)
  done
  echo "$admin"
}
# A fleet started once the proxy is ready already has connections a second later: a base read
# then held a few hundred sessions (about 300 B per session low at 9,000).
rss_before_first_connection() {
  local base="" r open
  while :; do
    r=$(grep "$3" "/proc/$1/status" | awk '{print $2}')
    open=$(curl -s -m1 "http://$2/metrics" | awk '/^wasmbed_proxy_connections_open\{/ {n += $2} END {print n + 0}')
    [ "$open" -gt 0 ] && break
    base=$r
    sleep 0.05
  done
  echo "$base"
}
