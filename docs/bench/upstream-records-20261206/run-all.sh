#!/bin/bash
# The benches of docs/performance.md "The proxy's TLS to gateways and TLS 1.2 devices on the
# same records", in the order run. NEW: the final build; BASE: the session's start (a3b97b4);
# NO12: NEW with TLS 1.2 left on rustls' connection (a scratch build: no-tls12-shed.patch,
# never committed). From the repository root:
#   bash docs/bench/upstream-records-20261206/run-all.sh NEW BASE NO12
# (The first-*.txt files are the first runs, of 2246acf against 2a7d043.)
set -u
NEW=$1 BASE=$2 NO12=$3 D=docs/bench/upstream-records-20261206
# A TLS connection per session to its gateway (--upstream tcp): memory, CPU per new session,
# CPU per DATA, against the session's start.
bash $D/memory.sh "$NEW" "$BASE" > $D/memory-6000.txt 2>&1
{ lscpu | grep "Model name"; bash $D/ramp-cpu.sh "$NEW" "$BASE" "$NEW" "$BASE" "$NEW" "$BASE"; } > $D/ramp-cpu.txt 2>&1
{ lscpu | grep "Model name"; UPSTREAM=tcp bash docs/bench/message-leftovers-20261206/cpu-per-message.sh "$NEW" "$BASE" "$NEW" "$BASE" "$NEW" "$BASE"; } > $D/cpu-per-message.txt 2>&1
# TLS 1.2 devices (--tls12) over the link: memory and CPU per DATA, with and without their
# records shed.
{ lscpu | grep "Model name"; for _ in 1 2 3; do for b in "$NEW" "$NO12"; do
  SAMPLES=3 EVERY=20 bash docs/bench/message-leftovers-20261206/rss-over-time.sh "$b" 6000 tcp --tls12
done; done; } > $D/tls12-memory-6000.txt 2>&1
{ lscpu | grep "Model name"; UP_ARGS=--tls12 bash docs/bench/message-leftovers-20261206/cpu-per-message.sh "$NEW" "$NO12" "$NEW" "$NO12" "$NEW" "$NO12"; } > $D/tls12-cpu-per-message.txt 2>&1
