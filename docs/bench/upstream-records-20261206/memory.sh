#!/bin/bash
# An idle terminated session with a TLS connection per session to its gateway (`--upstream
# tcp`, `[upstream_tls]`): the proxy's anonymous RSS per session, NEW and BASE interleaved,
# PAIRS pairs (default 3), N devices (default 6,000), three readings 20 s apart once all are
# connected. From the repository root: bash docs/bench/upstream-records-20261206/memory.sh NEW BASE
set -u
NEW=$1 BASE=$2 N=${N:-6000}
lscpu | grep "Model name"
for _ in $(seq "${PAIRS:-3}"); do
  for b in "$NEW" "$BASE"; do
    UPSTREAM=tcp SAMPLES=3 EVERY=20 bash docs/bench/message-leftovers-20261206/rss-over-time.sh "$b" "$N" tcp
  done
done
