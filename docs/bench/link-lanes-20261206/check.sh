#!/bin/bash
# The fourth sitting: the commit the session ended on (445d563), whose data path is 6702940's
# but for the accept loops' mark and a timer made under its runtime, checked: the storm over
# the link (two rounds, three builds) and the failover (two rounds, two builds).
set -u
D=docs/bench/link-lanes-20261206
bash $D/storm-lanes.sh 2 end:/tmp/lanes24d workers-s4:/tmp/base23 noworkers-link-s4:/tmp/nolinkw23 > $D/storm-check-output.txt 2>&1
bash $D/failover-lanes.sh 2 /tmp/lanes24d /tmp/base23 > $D/failover-check-output.txt 2>&1
