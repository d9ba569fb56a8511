#!/bin/bash
# The 9,000-device failover over the link (`docs/bench/failover-runs.sh BIN 1`), builds
# interleaved, ROUNDS rounds. From the repository root:
#   bash docs/bench/link-lanes-20261206/failover-lanes.sh ROUNDS BIN [BIN ...]
set -u
ROUNDS=$1; shift
for i in $(seq 1 "$ROUNDS"); do
  for B in "$@"; do
    bash docs/bench/failover-runs.sh "$B" 1 | grep -v "Model name\|^passed"
  done
done
lscpu | grep "Model name"
