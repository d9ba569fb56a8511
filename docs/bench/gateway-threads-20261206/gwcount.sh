#!/bin/bash
# One storm; every gateway's counters summed every 0.5 s; the last full sample is printed. BIN TAG [up flags]
B=$1; TAG=$2; shift 2
OUT=/tmp/gwcount-$TAG.txt
timeout 600 "$B" up --mode terminate --transport tcp --upstream link --gateways 5 --devices 9000 --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > $OUT 2>&1 &
up=$!
last=""
while kill -0 $up 2>/dev/null; do
  pids=$(pgrep -f "^$B gateway")
  n=$(echo $pids | wc -w)
  s=$(for pid in $pids; do
    for port in $(ss -ltnpH | grep "pid=$pid," | awk '{print $4}' | sed 's/.*://'); do
      curl -s -m 1 "http://127.0.0.1:$port/metrics" | grep -E "^wasmbed_gateway_(sessions_accepted_total|frames_in_total|frames_out_total|app_calls_total|resumes_total|checkpoints_total|links_total|errors_sent_total|proxy_headers_total)"
    done
  done | awk '{s[$1]+=$2} END {for (k in s) print k, s[k]}' | sort)
  [ "$n" = 5 ] && [ -n "$s" ] && last="$s"
  sleep 0.5
done
echo "$last"
grep -E "^(back|over the storm)" $OUT
