//! The UDP socket under a QUIC endpoint (quinn), shared by the proxy's QUIC listener and
//! links, the gateway's link and the load test's devices.
//!
//! Linux's default socket buffer (`net.core.rmem_default`, about 208 KiB) holds a few hundred
//! datagrams: thousands of QUIC connections on one socket overflow it in a burst (a failover,
//! a fleet connecting), the kernel drops datagrams (`RcvbufErrors` in /proc/net/snmp), and
//! QUIC recovers them only by retransmission after a probe timeout — seconds of delay.
//! So the socket asks for [`BUFFER`] each way; Linux caps the request at `net.core.rmem_max` /
//! `wmem_max` and then doubles it (its bookkeeping overhead), so with a 16 MiB `rmem_max` the
//! socket gets 32 MiB: room for about 14,000 full-size datagrams, the Initials of 7,000 devices
//! arriving at once (a ClientHello with a post-quantum key share takes two). See
//! [`granted_receive_buffer`] to tell whether the host allowed it.

use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

/// Bytes asked for each socket buffer (only what is queued is ever charged).
pub const BUFFER: usize = 32 << 20;

/// A non-blocking UDP socket bound to `addr`, with large buffers (best effort).
pub fn socket(addr: SocketAddr) -> std::io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if addr.is_ipv6() {
        // Both families on an unspecified IPv6 address, as quinn's own binding does.
        let _ = socket.set_only_v6(false);
    }
    let _ = socket.set_recv_buffer_size(BUFFER);
    let _ = socket.set_send_buffer_size(BUFFER);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The receive buffer the kernel gave `socket`, as it reports it (Linux: twice the capped
/// request). Below [`BUFFER`], `net.core.rmem_max` is under half of it: a burst of datagrams
/// the size of a fleet reconnecting may be dropped.
pub fn granted_receive_buffer(socket: &UdpSocket) -> std::io::Result<usize> {
    socket2::SockRef::from(socket).recv_buffer_size()
}

/// A quinn endpoint on [`socket`]`(addr)`: a server with `server`, else a client only.
pub fn endpoint(
    addr: SocketAddr,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    endpoint_on(socket(addr)?, server)
}

/// A quinn endpoint on `socket` (one [`socket`] made), on the current tokio runtime.
pub fn endpoint_on(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
) -> std::io::Result<quinn::Endpoint> {
    endpoint_with(socket, server, runtime()?)
}

/// A quinn endpoint on `socket` run by `runtime` (its socket registered, its tasks spawned,
/// where that runtime says).
pub fn endpoint_with(
    socket: UdpSocket,
    server: Option<quinn::ServerConfig>,
    runtime: std::sync::Arc<dyn quinn::Runtime>,
) -> std::io::Result<quinn::Endpoint> {
    quinn::Endpoint::new(quinn::EndpointConfig::default(), server, socket, runtime)
}

/// The async runtime a quinn endpoint runs on (the current tokio runtime's).
pub fn runtime() -> std::io::Result<std::sync::Arc<dyn quinn::Runtime>> {
    quinn::default_runtime()
        .ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))
}
