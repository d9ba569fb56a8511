#!/bin/bash
# The 9,000-device TLS-over-TCP reconnect storm over the link; one binary, variants by environment,
# interleaved. Usage: storm-env.sh ROUNDS BIN OUTDIR tag:K=V,K=V ... (tag:- for none)
set -u
ROUNDS=$1; B=$2; D=$3; shift 3
mkdir -p "$D"
lscpu | grep "Model name"
for i in $(seq 1 "$ROUNDS"); do
  for pair in "$@"; do
    tag=${pair%%:*}; envs=${pair#*:}
    [ "$envs" = "-" ] && envs=""
    out=$D/storm9k-$tag-$i.txt
    # shellcheck disable=SC2086
    env ${envs//,/ } timeout 900 "$B" up --mode terminate --transport tcp --upstream link --gateways 5 --devices 9000 \
      --rate 1 --ramp 1000 --scenario storm --listen 127.0.0.1:0 --admin 127.0.0.1:0 > "$out" 2>&1
    code=$?
    echo "== $tag $i (exit $code)"
    grep -E "^(back|gateways marked|over the storm|FAILED|all checks)" "$out"
  done
done
