//! A real DNS server (hickory-server), authoritative for one zone on a loopback address, whose
//! records its owner changes while it runs: addresses appear and vanish, a name goes NXDOMAIN,
//! the server stops answering. The test suites use it to drive the proxy's discovery, and
//! `wasmbed up --scenario soak` to move gateways the way a headless Service's records do.
//! Names are the caller's own (constants of its code), not input.

use std::net::{Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::time::Duration;

use hickory_server::Server;
use hickory_server::net::runtime::{Time, TokioRuntimeProvider};
use hickory_server::proto::rr::rdata::{A, SOA, SRV, TXT};
use hickory_server::proto::rr::{LowerName, Name, RData, Record, RecordType, RrKey};
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::store::in_memory::InMemoryZoneHandler;
use hickory_server::zone_handler::{AxfrPolicy, Catalog, ZoneType};

/// The zone every name lives in (names are taken relative to it unless they end in it).
pub const ZONE: &str = "wasmbed.test.";

/// A DNS server on 127.0.0.1 (UDP and TCP on one port), authoritative for [`ZONE`].
pub struct DnsServer {
    pub addr: SocketAddr,
    zone: Arc<InMemoryZoneHandler<TokioRuntimeProvider>>,
    stalled: Arc<AtomicBool>,
    /// Queries answered (or held, while stalled).
    queries: Arc<std::sync::atomic::AtomicUsize>,
    serial: AtomicU32,
    task: tokio::task::JoinHandle<()>,
}

struct Handler {
    catalog: Catalog,
    stalled: Arc<AtomicBool>,
    /// Queries answered (or held, while stalled).
    queries: Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl RequestHandler for Handler {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        self.queries.fetch_add(1, Ordering::SeqCst);
        if self.stalled.load(Ordering::SeqCst) {
            // A server that stopped answering: the query is held until the client gives up.
            tokio::time::sleep(Duration::from_secs(60)).await;
        }
        self.catalog
            .handle_request::<R, T>(request, response_handle)
            .await
    }
}

fn name(text: &str) -> Name {
    let full = if text.ends_with('.') {
        text.to_string()
    } else if format!("{text}.").ends_with(ZONE) {
        format!("{text}.")
    } else {
        format!("{text}.{ZONE}")
    };
    Name::from_ascii(full).expect("a DNS name of the caller's code")
}

impl DnsServer {
    /// On 127.0.0.1, a port the OS chooses.
    pub async fn start() -> std::io::Result<DnsServer> {
        Self::start_on((Ipv4Addr::LOCALHOST, 0).into()).await
    }

    /// On `addr` (port 0: the OS chooses; UDP and TCP share the port).
    pub async fn start_on(addr: SocketAddr) -> std::io::Result<DnsServer> {
        let origin = name(ZONE);
        let mut zone = InMemoryZoneHandler::<TokioRuntimeProvider>::empty(
            origin.clone(),
            ZoneType::Primary,
            AxfrPolicy::Deny,
        );
        let soa = SOA::new(name("ns"), name("admin"), 1, 60, 60, 60, 1);
        zone.upsert_mut(Record::from_rdata(origin.clone(), 1, RData::SOA(soa)), 1);
        let zone = Arc::new(zone);
        let mut catalog = Catalog::new();
        catalog.upsert(LowerName::new(&origin), vec![zone.clone()]);
        let stalled = Arc::new(AtomicBool::new(false));
        let queries = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        // UDP and TCP on one port: the TCP side of the port the OS gave UDP may be taken.
        let mut attempts = 0;
        let (udp, tcp, bound) = loop {
            let udp = tokio::net::UdpSocket::bind(addr).await?;
            let addr = udp.local_addr()?;
            match tokio::net::TcpListener::bind(addr).await {
                Ok(tcp) => break (udp, tcp, addr),
                Err(_) if attempts < 20 => attempts += 1,
                Err(e) => return Err(e),
            }
        };
        let mut server = Server::new(Handler {
            catalog,
            stalled: stalled.clone(),
            queries: queries.clone(),
        });
        server.register_socket(udp);
        server.register_listener(tcp, Duration::from_secs(5), 1 << 16);
        let task = tokio::spawn(async move {
            let _ = server.block_until_done().await;
        });
        Ok(DnsServer {
            addr: bound,
            zone,
            stalled,
            queries,
            serial: AtomicU32::new(2),
            task,
        })
    }

    /// The queries it has received so far.
    pub fn queries(&self) -> usize {
        self.queries.load(Ordering::SeqCst)
    }

    fn serial(&self) -> u32 {
        self.serial.fetch_add(1, Ordering::SeqCst)
    }

    async fn clear(&self, owner: &Name) {
        let mut records = self.zone.records_mut().await;
        for t in [RecordType::A, RecordType::SRV, RecordType::TXT] {
            records.remove(&RrKey::new(LowerName::new(owner), t));
        }
    }

    /// `host` (relative to [`ZONE`]) now has exactly these A records, with `ttl` seconds.
    pub async fn set_a(&self, host: &str, ips: &[Ipv4Addr], ttl: u32) {
        let owner = name(host);
        self.clear(&owner).await;
        let serial = self.serial();
        for ip in ips {
            self.zone
                .upsert(
                    Record::from_rdata(owner.clone(), ttl, RData::A(A(*ip))),
                    serial,
                )
                .await;
        }
    }

    /// `host` now has exactly these SRV records: (target host, port).
    pub async fn set_srv(&self, host: &str, targets: &[(&str, u16)], ttl: u32) {
        let owner = name(host);
        self.clear(&owner).await;
        let serial = self.serial();
        for (target, port) in targets {
            let srv = SRV::new(0, 1, *port, name(target));
            self.zone
                .upsert(
                    Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)),
                    serial,
                )
                .await;
        }
    }

    /// `host` exists with no address: an empty (NODATA) answer.
    pub async fn set_empty(&self, host: &str) {
        let owner = name(host);
        self.clear(&owner).await;
        let serial = self.serial();
        let txt = TXT::new(vec!["no address here".into()]);
        self.zone
            .upsert(Record::from_rdata(owner, 1, RData::TXT(txt)), serial)
            .await;
    }

    /// `host` no longer exists: NXDOMAIN.
    pub async fn remove(&self, host: &str) {
        self.clear(&name(host)).await;
    }

    /// The server stops answering (queries time out), or answers again.
    pub fn stall(&self, stalled: bool) {
        self.stalled.store(stalled, Ordering::SeqCst);
    }
}

impl Drop for DnsServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}
