#!/bin/bash
# steady.sh BIN DEVICES TAG [extra up args]: a QUIC fleet at 2 DATA/s, paced arrivals; after
# warm-up: CPU per process over 20 s, UDP datagrams per second, one perf profile of the proxy.
BIN=$1; N=$2; TAG=$3; shift 3
cd /tmp/st
setsid $BIN up --mode terminate --upstream link --transport ${TRANSPORT:-quic} --devices $N --ramp 300 --listen 127.0.0.1:0 --admin 127.0.0.1:0 "$@" > up-$TAG.log 2>&1 < /dev/null &
UP=$!
sleep $(( N / 300 + 25 ))
P=$(pgrep -f "wasmbed proxy" | head -1)
snap() { grep "^Udp:" /proc/net/snmp | tail -1 | awk '{print $2, $4}'; }
read in0 err0 < <(snap)
timeout 22 python3 /tmp/cpuwatch.py > cpu-$TAG.txt
read in1 err1 < <(snap)
echo "$TAG: udp in/s $(( (in1-in0)/22 )) rcvbuf-errors $(( err1-err0 ))"
tail -5 cpu-$TAG.txt
kill -TERM -$UP; wait $UP 2>/dev/null
