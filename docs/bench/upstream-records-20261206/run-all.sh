#!/bin/bash
# The benches of docs/performance.md "The proxy's TLS to gateways on the same records", in the
# order run: NEW the build with the change, BASE the session's start (its device-side records
# already in). From the repository root: bash docs/bench/upstream-records-20261206/run-all.sh NEW BASE
set -u
NEW=$1 BASE=$2 D=docs/bench/upstream-records-20261206
bash $D/memory.sh "$NEW" "$BASE" > $D/memory-6000.txt 2>&1
{ lscpu | grep "Model name"; bash $D/ramp-cpu.sh "$NEW" "$BASE" "$NEW" "$BASE" "$NEW" "$BASE"; } > $D/ramp-cpu.txt 2>&1
{ lscpu | grep "Model name"; UPSTREAM=tcp bash docs/bench/message-leftovers-20261206/cpu-per-message.sh "$NEW" "$BASE" "$NEW" "$BASE" "$NEW" "$BASE"; } > $D/cpu-per-message.txt 2>&1
