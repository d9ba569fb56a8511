#!/bin/bash
set -e
B=/work/main/target/release/wasmbed
cd /tmp/lt
$B certs init --dir pki --devices 0 --gateways 3 --force > /dev/null
GW=""
for i in 0 1 2; do
  WASMBED_LOG=warn $B gateway --name gw-$i --listen 127.0.0.1:0 --admin 127.0.0.1:0 --apps /work/main/apps --idle-timeout 10m \
    --tls-cert pki/gateway-$i.pem --tls-key pki/gateway-$i.key --client-ca pki/ca.pem > gw$i.out 2>gw$i.err &
done
sleep 2
for i in 0 1 2; do
  L=$(grep -o 'listen=[0-9.:]*' gw$i.out | cut -d= -f2); A=$(grep -o 'admin=[0-9.:]*' gw$i.out | cut -d= -f2)
  GW="$GW,gw-$i=$L;health=$A"
done
WASMBED_LOG=warn $B proxy --listen 127.0.0.1:18443 --admin 127.0.0.1:0 --health http --gateway "${GW#,}" > proxy.out 2>proxy.err &
sleep 1
/usr/bin/time -f "loadtest: %e s elapsed, %U s user, %S s sys, max RSS %M KiB" $B loadtest --ca-dir pki --target 127.0.0.1:18443 --devices 9000 --rate "$1" --duration 20s --json lt.json > lt.out 2> lt.time || true
cat lt.out; cat lt.time | tail -1
pkill -f "wasmbed gateway --name gw-" ; pkill -f "listen 127.0.0.1:18443"
