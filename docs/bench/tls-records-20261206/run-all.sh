#!/bin/bash
# The benches of docs/performance.md "The records without rustls' connection", in the order run:
# NEW is the build with the records (s28b), BASE the session's start (base28). From the repository root.
set -u
NEW=$1 BASE=$2 D=docs/bench/tls-records-20261206
lscpu | grep "Model name"
# Memory: one more interleaved pair with the final build.
for b in $NEW $BASE; do SAMPLES=8 bash docs/bench/message-leftovers-20261206/rss-over-time.sh $b 9000 tcp; done > $D/tcp-9000-rss-over-time-final.txt 2>&1
# CPU per DATA, terminated TCP over the link, 2,000 devices at 5 DATA/s: three pairs.
bash docs/bench/message-leftovers-20261206/cpu-per-message.sh $NEW $BASE $NEW $BASE $NEW $BASE > $D/tcp-cpu-per-message.txt 2>&1
# The terminating scenarios of the peer bench, against the session's start.
python3 bench/peer_bench.py --runs 5 --seconds 5 --scenarios tlsterm,tlsbulk --proxies wasmbed,wasmbed-b --wasmbed $NEW --compare $BASE --out $D > $D/peer-tlsterm-tlsbulk.txt 2>&1
