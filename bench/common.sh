# Shared by the bench scripts that start their own processes (source it after setting B):
# a temporary directory W (removed at exit, every PID in PIDS killed), a PKI in D for
# DEVICES devices and one gateway identity, the echo app in D/apps, and `field NAME LINE`,
# which reads NAME=VALUE out of a process's `ready ...` line.
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
