#!/usr/bin/env bash
# The headline scenario N times with one binary: how many runs pass their own checks.
#   docs/bench/failover-runs.sh BIN RUNS [extra up flags...]
# e.g. docs/bench/failover-runs.sh target/release/wasmbed 10
# One line per run (the JSON report's figures), then the count. Each run: a fresh stack,
# 9,000 devices in terminate mode over the link, one gateway SIGKILLed under load.
set -uo pipefail
bin=${1:?BIN}; runs=${2:?RUNS}; shift 2
out=$(mktemp -d)
lscpu | grep 'Model name'
echo "binary: $bin"
pass=0
for i in $(seq 1 "$runs"); do
  "$bin" up --mode terminate --upstream link --scenario failover --devices 9000 \
    --listen 127.0.0.1:0 --admin 127.0.0.1:0 --json "$out/$i.json" "$@" > "$out/$i.log" 2>&1
  code=$?
  [ "$code" = 0 ] && pass=$((pass + 1))
  python3 - "$out/$i.json" "$i" "$code" <<'PY'
import json, sys
path, i, code = sys.argv[1:]
try:
    d = json.load(open(path))
except Exception as e:
    print(f"run {i}: exit {code}, no report ({e})"); sys.exit()
sb = d["spread_before"].values()
print(f"run {i}: exit {code}  spread before max-min {max(sb) - min(sb)}  state resets {d['state_resets']}  "
      f"disconnects {d['disconnects']}  longest reply wait at a device {d['longest_reply_wait_ms']:.0f} ms  "
      f"proxy pause p99 <= {d['pause_p99_ms_bucket']} ms  failed: {d['failed_checks']}")
PY
done
echo "passed $pass of $runs"
