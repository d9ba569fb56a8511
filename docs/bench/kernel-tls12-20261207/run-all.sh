#!/bin/bash
# The bench of docs/performance.md "Nothing of rustls' kept for a TLS 1.2 session": the
# proxy's anonymous RSS per idle terminated session over the link, 6,000 devices, TLS 1.2
# (`--tls12`) then TLS 1.3, NEW against BASE interleaved, three pairs each.
# NEW: the change (7fc4fc9); BASE: the commit before it (b723146). From the repository root:
#   bash docs/bench/kernel-tls12-20261207/run-all.sh NEW BASE
set -u
NEW=$1 BASE=$2 D=docs/bench/kernel-tls12-20261207
R=docs/bench/message-leftovers-20261206/rss-over-time.sh
{ lscpu | grep "Model name"; for _ in 1 2 3; do for b in "$NEW" "$BASE"; do
  SAMPLES=3 EVERY=20 bash $R "$b" 6000 tcp --tls12
done; done; } > $D/tls12-memory-6000.txt 2>&1
{ lscpu | grep "Model name"; for _ in 1 2 3; do for b in "$NEW" "$BASE"; do
  SAMPLES=3 EVERY=20 bash $R "$b" 6000 tcp
done; done; } > $D/tls13-memory-6000.txt 2>&1
# Live heap by site for TLS 1.2 devices, each build once (heaptrack; 500 and 2,000 devices).
for b in "$BASE" "$NEW"; do
  echo "== $(basename "$b")"; TRANSPORT=tcp LOADTEST_ARGS=--tls12 WASMBED=$b OUT=/tmp/heap-$(basename "$b") bash bench/quic-heap.sh 500 2000
done 2>&1 | grep -v Killed > $D/heap-tls12-500-2000.txt
