#!/usr/bin/env bash
# Builds a wasmbed image on a machine with no container registry and no Docker engine, and runs
# `wasmbed up --scenario failover` inside it.
#
# The Dockerfile at the top level needs base images from registries (rust, distroless), which
# this machine kind cannot pull. This script builds the same runtime contents from scratch
# with buildah: the release binary, the shared libraries it links (`ldd`), CA certificates,
# the example apps, a non-root user id, `wasmbed` as entrypoint, the OCI labels. It then runs
# the scenario in the image's filesystem with buildah's chroot isolation: an OCI runtime with
# namespaces does not start in this sandbox ("did not get container create message from
# subprocess"), chroot does.
#
# Needs: buildah (Debian: apt-get install buildah), root. Run from the repository root:
#   bash deploy/image-test.sh
set -euo pipefail
cd "$(dirname "$0")/.."
command -v buildah >/dev/null || { echo "needs buildah (apt-get install buildah)" >&2; exit 2; }
B=(buildah --storage-driver vfs)
cargo build --release --locked --bin wasmbed
work=$(mktemp -d)
bin="$work/wasmbed"
cp target/release/wasmbed "$bin"
strip "$bin"
mkdir "$work/tmp"

ctr=$("${B[@]}" from scratch)
cleanup() { "${B[@]}" rm "$ctr" >/dev/null 2>&1 || true; rm -rf "$work"; }
trap cleanup EXIT
"${B[@]}" copy "$ctr" "$bin" /usr/local/bin/wasmbed >/dev/null
# The binary's shared libraries (glibc, libgcc, the loader), at the paths it looks for them.
for lib in $(ldd "$bin" | awk '/=>/ {print $3} /ld-linux/ {print $1}'); do
  "${B[@]}" copy "$ctr" "$lib" "$lib" >/dev/null
done
# A writable /tmp (the non-root user's scratch space: `wasmbed up` puts its dev PKI there).
"${B[@]}" copy --chown 65532:65532 --chmod 1777 "$ctr" "$work/tmp" /tmp >/dev/null
"${B[@]}" copy "$ctr" /etc/ssl/certs/ca-certificates.crt /etc/ssl/certs/ca-certificates.crt >/dev/null
for app in echo counter average push; do
  "${B[@]}" copy "$ctr" "apps/$app.wat" "/usr/share/wasmbed/apps/$app.wat" >/dev/null
done
"${B[@]}" config \
  --entrypoint '["/usr/local/bin/wasmbed"]' --cmd '--help' --user 65532:65532 \
  --label org.opencontainers.image.title=wasmbed \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  --port 8443 --port 9900 --port 9001 --port 9101 "$ctr"
"${B[@]}" commit "$ctr" wasmbed:test >/dev/null
echo "image wasmbed:test: $("${B[@]}" images --format '{{.Size}}' wasmbed:test)"

# Run the stack inside the image (a fresh working container of it; /tmp for the dev PKI).
run=$("${B[@]}" from wasmbed:test)
trap 'cleanup; "${B[@]}" rm "$run" >/dev/null 2>&1 || true' EXIT
"${B[@]}" run --isolation chroot --user 0:0 "$run" -- /usr/local/bin/wasmbed --version
"${B[@]}" run --isolation chroot "$run" -- /usr/local/bin/wasmbed up --scenario failover \
  --gateways 3 --devices 20 --listen 127.0.0.1:0 --admin 127.0.0.1:0 --dir /tmp/stack
