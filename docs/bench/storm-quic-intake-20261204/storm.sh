#!/bin/bash
# storm.sh TAG [up args...]: one 9,000-device QUIC storm, with UDP and CPU samples
TAG=$1; shift
cd /work/main
python3 /tmp/udpwatch.py > /tmp/st/udp-$TAG.txt & U=$!
python3 /tmp/cpuwatch.py > /tmp/st/cpu-$TAG.txt & C=$!
timeout 900 ${BIN:-./target/release/wasmbed} up --mode terminate --upstream link --transport ${TRANSPORT:-quic} --scenario storm --devices 9000 "$@" > /tmp/st/storm-$TAG.txt 2>&1
kill $U $C
grep -E "^(back|handshakes|gateways marked|devices|state|all checks|FAILED)" /tmp/st/storm-$TAG.txt | cut -c1-330
