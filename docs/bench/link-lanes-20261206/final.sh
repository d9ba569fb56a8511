#!/bin/bash
# The final build (6702940) measured: the storm over the link (three builds), the failover over
# the link (two builds), idle memory (two builds), then the storm in the two other modes
# against the build before session workers. From the repository root.
set -u
D=docs/bench/link-lanes-20261206
NEW=/tmp/lanes24c WORKERS=/tmp/base23 NOWORKERS=/tmp/nolinkw23 BEFORE=/tmp/new21
bash $D/storm-lanes.sh 3 lanes-final:$NEW workers:$WORKERS noworkers-link:$NOWORKERS > $D/storm-lanes-final-output.txt 2>&1
bash $D/failover-lanes.sh 3 $NEW $WORKERS > $D/failover-lanes-final-output.txt 2>&1
for i in 1 2; do
  for B in $NEW $WORKERS; do
    echo "== $B run $i"
    WASMBED_BIN=$B RAMP=250 REPS=1 VARIANTS=link bash docs/bench/terminate-memory.sh
  done
done > $D/memory-link-final2-output.txt 2>&1
KIND=tcp-tcp UP="--mode terminate --transport tcp --upstream tcp" \
  bash $D/storm-lanes.sh 2 lanes-final:$NEW before-workers:$BEFORE > $D/storm-tcp-upstream-output.txt 2>&1
KIND=passthrough UP="--mode passthrough --transport tcp" \
  bash $D/storm-lanes.sh 2 lanes-final:$NEW before-workers:$BEFORE > $D/storm-passthrough-output.txt 2>&1
