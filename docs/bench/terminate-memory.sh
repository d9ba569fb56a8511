#!/bin/bash
# Proxy memory and descriptors per idle session: `wasmbed up` with N devices (one DATA per
# 100 s each), the proxy's RSS and open descriptors once all are connected; per session =
# difference between N=1000 and N=4000 / 3000.
# Release build; run from the repository root: bash docs/bench/terminate-memory.sh
# WASMBED_BIN=PATH measures another build (e.g. one from before a change).
# VARIANTS picks some of: quic-link link tls-link plain-link passthrough (default: all).
# RAMP: new devices per second (default 2000; a slower ramp leaves fewer handshakes' freed
# pages in the RSS); REPS: runs of each variant (default 1), each printed.
# Also printed: the fleet simulator's own RSS per device (the `up` process), for QUIC devices.
set -u
B=${WASMBED_BIN:-./target/release/wasmbed}
args_of() {
  case $1 in
    quic-link) echo "--mode terminate --upstream link --transport quic" ;;
    link) echo "--mode terminate --upstream link" ;;
    tls-link) echo "--mode terminate" ;;
    plain-link) echo "--mode terminate --plain-link" ;;
    passthrough) echo "--mode passthrough" ;;
  esac
}
measure() { # variant, devices -> "RSS_KiB FDS FLEET_RSS_KiB"
  local v=$1 n=$2 out=/tmp/mem-$1-$2.txt
  # Emptied here, not by the redirection below: that runs in the background job, and a
  # check that ran before it would read the previous run's "connected N/N".
  : > "$out"
  # shellcheck disable=SC2046
  $B up $(args_of "$v") --gateways 5 --devices "$n" --rate 0.01 --ramp "${RAMP:-2000}" \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1 &
  local up=$!
  until grep -Eq "connected +$n/$n" "$out"; do sleep 1; done
  sleep 3
  local proxy
  proxy=$(pgrep -P "$up" -f " proxy --listen")
  echo "$(grep VmRSS "/proc/$proxy/status" | awk '{print $2}') $(ls "/proc/$proxy/fd" | wc -l) $(grep VmRSS "/proc/$up/status" | awk '{print $2}')"
  kill -INT "$up"; wait "$up" 2>/dev/null
}
lscpu | grep "Model name"
for v in ${VARIANTS:-quic-link link tls-link plain-link passthrough}; do
 for _ in $(seq "${REPS:-1}"); do
  read -r a fa ua <<< "$(measure "$v" 1000)"; read -r b fb ub <<< "$(measure "$v" 4000)"
  echo "$v: proxy RSS $a KiB at 1000 sessions, $b KiB at 4000: $(( (b - a) * 1024 / 3000 )) bytes per idle session; descriptors $fa at 1000, $fb at 4000; fleet $(( (ub - ua) * 1024 / 3000 )) bytes per device"
 done
done
