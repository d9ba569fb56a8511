#!/bin/bash
# The benches of docs/performance.md "quinn's event channel, the largest item of a QUIC
# session" (2026-12-07), in the order run.
# NEW: the proxy built with quinn-event-queue.patch applied to quinn 0.11.12 (a scratch build:
# `[patch.crates-io] quinn = { path = ... }` over the patched crate; never committed);
# BASE: the same commit without it. From the repository root:
#   bash docs/bench/quinn-events-20261207/run-all.sh NEW BASE
set -u
NEW=$1 BASE=$2 D=docs/bench/quinn-events-20261207
if [ -z "${3:-}" ]; then
# Memory per QUIC session over time, 6,000 devices over the link, three pairs interleaved.
{ lscpu | grep "Model name"; for _ in 1 2 3; do for b in "$NEW" "$BASE"; do
  RATE=0.05 SAMPLES=6 EVERY=30 bash docs/bench/message-leftovers-20261206/rss-over-time.sh "$b" 6000 quic
done; done; } > $D/quic-memory-6000.txt 2>&1
# The proxy's CPU per DATA for QUIC devices, three pairs interleaved.
{ lscpu | grep "Model name"; TRANSPORT=quic DEVICES=2000 RATE=2 bash docs/bench/message-leftovers-20261206/cpu-per-message.sh "$NEW" "$BASE" "$NEW" "$BASE" "$NEW" "$BASE"; } > $D/quic-cpu-per-message.txt 2>&1
# Live heap per idle QUIC session by allocation site, 200 s after connecting (past the
# channel's first 32 events), each build once.
for b in "$NEW" "$BASE"; do
  WASMBED=$b TRANSPORT=quic RATE=0.02 SETTLE=200 OUT=/tmp/quic-heap-$(basename "$b") bench/quic-heap.sh 1000 2000 \
    > "$D/heap-quic-settled-200s-$(basename "$b").txt" 2>&1
done
fi
# Then the second change on top (quinn-send-buffer.patch): NEW2 is NEW with it too. Run as
#   bash docs/bench/quinn-events-20261207/run-all.sh NEW BASE NEW2
# (the part above ran first, without NEW2, which was built after it).
NEW2=${3:-}
[ -n "$NEW2" ] || exit 0
{ lscpu | grep "Model name"; for _ in 1 2; do for b in "$NEW2" "$NEW"; do
  RATE=0.05 SAMPLES=6 EVERY=30 bash docs/bench/message-leftovers-20261206/rss-over-time.sh "$b" 6000 quic
done; done; } > $D/send-buffer-quic-memory-6000.txt 2>&1
{ lscpu | grep "Model name"; TRANSPORT=quic DEVICES=2000 RATE=2 bash docs/bench/message-leftovers-20261206/cpu-per-message.sh "$NEW2" "$NEW" "$BASE" "$NEW2" "$NEW" "$BASE" "$NEW2" "$NEW" "$BASE"; } > $D/send-buffer-quic-cpu-per-message.txt 2>&1
