# syntax=docker/dockerfile:1
# Wasmbed edge: one image for `wasmbed proxy`, `wasmbed gateway` and the tools.
#   docker build -t wasmbed .
#   docker run --rm wasmbed proxy --help
# The runtime stage has the binary, the example apps and CA certificates; no shell.

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS build
WORKDIR /src
COPY . .
RUN cargo build --release --locked --bin wasmbed \
    && strip target/release/wasmbed

# Distroless "cc": glibc, libgcc, CA certificates, a nonroot user; no shell, no package manager.
FROM gcr.io/distroless/cc-debian12:nonroot
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="wasmbed" \
      org.opencontainers.image.description="Wasmbed edge: front proxy and WebAssembly gateways for embedded device fleets" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /src/target/release/wasmbed /usr/local/bin/wasmbed
COPY --from=build /src/apps/echo.wat /src/apps/counter.wat /src/apps/average.wat /src/apps/push.wat /usr/share/wasmbed/apps/
# distroless's nonroot user, by number (a name may not resolve on the host).
USER 65532:65532
# Devices (proxy), proxy admin, gateway sessions, gateway admin. Bind 0.0.0.0 in a container:
# the defaults are loopback addresses.
EXPOSE 8443 9900 9001 9101
ENTRYPOINT ["/usr/local/bin/wasmbed"]
CMD ["--help"]
