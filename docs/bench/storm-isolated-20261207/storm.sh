#!/bin/bash
# The 9,000-device TLS-over-TCP reconnect storm over the link; one binary, variants by environment,
# interleaved. Usage: [WATCH_GATEWAYS=1] storm.sh ROUNDS BIN OUTDIR tag:K=V,K=V ... (tag:- for none)
# WATCH_GATEWAYS=1 (sitting b): the gateways watched over the storm only (from up's "storm:" line to
# its "back:" line): their user and system CPU (/proc/PID/stat, ticks: not read, see README.md),
# and perf's count of their system calls, context switches and wake-ups (OUT/...txt.gwperf).
set -u
ROUNDS=$1; B=$2; D=$3; shift 3
WATCH=${WATCH_GATEWAYS:-}
mkdir -p "$D"
lscpu | grep "Model name"
ticks() { # user and system ticks summed over the pids given
  local u=0 s=0
  for p in "$@"; do
    read -r -a f < <(sed 's/.*) //' /proc/$p/stat 2>/dev/null) || continue
    u=$((u + f[11])); s=$((s + f[12]))
  done
  echo "$u $s"
}
for i in $(seq 1 "$ROUNDS"); do
  for pair in "$@"; do
    tag=${pair%%:*}; envs=${pair#*:}
    [ "$envs" = "-" ] && envs=""
    out=$D/storm9k-$tag-$i.txt
    # shellcheck disable=SC2086
    env ${envs//,/ } timeout 900 "$B" up --mode terminate --transport tcp --upstream link --gateways 5 --devices 9000 \
      --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1 &
    up=$!
    if [ -n "$WATCH" ]; then
      until grep -q "^storm:" "$out" 2>/dev/null || ! kill -0 $up 2>/dev/null; do sleep 0.02; done
      gws=$(pgrep -f "^$B gateway" | tr '\n' ',' | sed 's/,$//')
      read -r u0 s0 < <(ticks ${gws//,/ })
      perf stat -x, -e raw_syscalls:sys_enter,sched:sched_switch,sched:sched_wakeup -p "$gws" -o "$out.gwperf" &
      ps=$!
      until grep -q "^back:" "$out" 2>/dev/null || ! kill -0 $up 2>/dev/null; do sleep 0.02; done
      read -r u1 s1 < <(ticks ${gws//,/ })
      kill -INT $ps 2>/dev/null; wait $ps 2>/dev/null
    fi
    wait $up; code=$?
    echo "== $tag $i (exit $code)"
    if [ -n "$WATCH" ]; then
      grep -E "^(back|over the storm|FAILED|all checks)" "$out" | cut -c1-200
      echo "gateways over the storm: user $((u1-u0)) system $((s1-s0)) ticks; $(grep -v '^#' "$out.gwperf" | awk -F, 'NF>2{printf "%s %s; ", $3, $1}')"
    else
      grep -E "^(back|gateways marked|over the storm|FAILED|all checks)" "$out"
    fi
  done
done
