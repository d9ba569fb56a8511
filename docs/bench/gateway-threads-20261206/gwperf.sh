#!/bin/bash
# perf record on every gateway process of one storm run: BIN TAG [up flags...]
B=$1; TAG=$2; shift 2
OUT=/tmp/gwperf-$TAG; mkdir -p $OUT
timeout 600 "$B" up --mode terminate --transport tcp --upstream link --gateways 5 --devices 9000 --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > $OUT/run.txt 2>&1 &
up=$!
# wait for the storm line
for _ in $(seq 1 600); do grep -q "^storm:" $OUT/run.txt 2>/dev/null && break; sleep 0.05; done
pids=$(pgrep -f "^$B gateway" | paste -sd,)
perf record -F 999 -p "$pids" -o $OUT/perf.data -- sleep 4 2>/dev/null
wait $up
grep -E "^(back|over the storm)" $OUT/run.txt
