#!/bin/bash
# Rounds of four variants of one scratch binary, interleaved: lanes, lanes+ack, noworkers, noworkers+ack.
cd /work/main
B=/tmp/s26x
D=${D:-docs/bench/ack-frequency-20261206}
mkdir -p $D
for r in $(seq 1 "$1"); do
  for v in lanes lanes-ack noworkers noworkers-ack; do
    envs=()
    case $v in *ack*) envs+=(SCRATCH_ACK=1);; esac
    case $v in noworkers*) envs+=(SCRATCH_NOWORKERS=1);; esac
    env "${envs[@]}" D=$D KIND=tcp-link-r$r bash docs/bench/storm-split-20261206/storm.sh 1 "$v:$B" | grep -v "Model name"
  done
done
