//! dial: a gateway named by a host name, reached at the first of its addresses to answer, the
//! same for every upstream (TCP, the link) and its health checks (probes, liveness watch). Its addresses are tried as RFC 8305 ("Happy
//! Eyeballs") tries them: in the resolver's order, the next one started when the one before
//! fails or has not answered within [`NEXT_ADDRESS_AFTER`], every attempt left running, the
//! first made kept and the others dropped. Tried strictly in turn, an address that never
//! answers (a name's AAAA record for a gateway listening on IPv4 only; over QUIC, where a
//! closed UDP port draws no refusal the socket reports, any address nothing listens at) would
//! hold the whole `connect_timeout` before the next was tried, and the gateway would fail
//! where it is reachable. The caller bounds the whole by `connect_timeout`.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;

/// How long an attempt has before the next address is tried too: RFC 8305's recommended
/// "Connection Attempt Delay".
pub(crate) const NEXT_ADDRESS_AFTER: Duration = Duration::from_millis(250);

/// The first of `addrs` `attempt` makes a connection to, each started when the one before
/// fails or after `after` (waited by `wait`: the data plane's timers are the caller's, see
/// proxy/clippy.toml). All failing: the last failure; no address: `NotFound`.
pub(crate) async fn first_to_answer<T, E, Fut, Wait>(
    addrs: impl IntoIterator<Item = SocketAddr>,
    (after, mut wait): (Duration, impl FnMut(Duration) -> Wait),
    mut attempt: impl FnMut(SocketAddr) -> Fut,
) -> Result<T, E>
where
    Fut: Future<Output = Result<T, E>>,
    Wait: Future<Output = ()>,
    E: From<io::Error>,
{
    let mut addrs = addrs.into_iter().peekable();
    let mut tries = FuturesUnordered::new();
    let mut last = None;
    loop {
        if let Some(addr) = addrs.next() {
            tries.push(attempt(addr));
        }
        let more = addrs.peek().is_some();
        tokio::select! {
            Some(outcome) = tries.next() => match outcome {
                Ok(made) => return Ok(made),
                Err(e) => last = Some(e),
            },
            () = wait(after), if more => {}
            else => {
                return Err(last.unwrap_or_else(|| {
                    io::Error::new(io::ErrorKind::NotFound, "the name has no address").into()
                }));
            }
        }
    }
}

/// A TCP connection to `name` (`host:port`, or an address): its one address, or the first
/// of its addresses to answer ([`first_to_answer`], the stagger waited by `wait`).
pub(crate) async fn tcp<W: Future<Output = ()>>(
    name: &str,
    wait: impl FnMut(Duration) -> W,
) -> io::Result<tokio::net::TcpStream> {
    let addrs = addresses(name).await?;
    if let [one] = addrs[..] {
        return tokio::net::TcpStream::connect(one).await;
    }
    first_to_answer(
        addrs,
        (NEXT_ADDRESS_AFTER, wait),
        tokio::net::TcpStream::connect,
    )
    .await
}

/// `host:port` resolved: its addresses, in the resolver's order.
pub(crate) async fn addresses(name: &str) -> io::Result<Vec<SocketAddr>> {
    Ok(tokio::net::lookup_host(name).await?.collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::time::Instant;

    /// The stagger, waited on the test's paused clock.
    #[expect(
        clippy::disallowed_methods,
        reason = "a test's runtime, its time paused"
    )]
    fn paused() -> (Duration, impl FnMut(Duration) -> tokio::time::Sleep) {
        (NEXT_ADDRESS_AFTER, tokio::time::sleep)
    }

    fn addr(last: u8) -> SocketAddr {
        (std::net::Ipv4Addr::new(127, 0, 0, last), 9).into()
    }

    /// Each address's attempt: `Ok` after `answers`, an error after `fails`, or never.
    async fn attempt(
        addr: SocketAddr,
        plan: &[(SocketAddr, Option<Result<Duration, Duration>>)],
    ) -> io::Result<SocketAddr> {
        match plan.iter().find(|(a, _)| *a == addr).and_then(|(_, p)| *p) {
            Some(Ok(answers)) => {
                tokio::time::sleep(answers).await;
                Ok(addr)
            }
            Some(Err(fails)) => {
                tokio::time::sleep(fails).await;
                Err(io::Error::new(io::ErrorKind::ConnectionRefused, "refused"))
            }
            None => std::future::pending().await,
        }
    }

    #[tokio::test(start_paused = true)]
    async fn an_address_that_never_answers_does_not_hold_the_next() {
        let ms = Duration::from_millis;
        let plan = [(addr(1), None), (addr(2), Some(Ok(ms(10))))];
        let started = Instant::now();
        let made = first_to_answer([addr(1), addr(2)], paused(), |a| attempt(a, &plan))
            .await
            .unwrap();
        assert_eq!(made, addr(2));
        assert_eq!(started.elapsed(), NEXT_ADDRESS_AFTER + ms(10));
    }

    #[tokio::test(start_paused = true)]
    async fn a_refusal_starts_the_next_at_once_and_the_first_to_answer_wins() {
        let ms = Duration::from_millis;
        // The first refuses at once: the second starts then. The second answers late, after
        // the third (started 250 ms after the second) has answered.
        let plan = [
            (addr(1), Some(Err(ms(5)))),
            (addr(2), Some(Ok(ms(900)))),
            (addr(3), Some(Ok(ms(20)))),
        ];
        let started = Instant::now();
        let made = first_to_answer([addr(1), addr(2), addr(3)], paused(), |a| attempt(a, &plan))
            .await
            .unwrap();
        assert_eq!(made, addr(3));
        assert_eq!(started.elapsed(), ms(5) + NEXT_ADDRESS_AFTER + ms(20));
    }

    #[tokio::test(start_paused = true)]
    async fn every_address_failing_gives_the_last_failure_and_none_gives_not_found() {
        let ms = Duration::from_millis;
        let plan = [(addr(1), Some(Err(ms(400)))), (addr(2), Some(Err(ms(1))))];
        let e = first_to_answer([addr(1), addr(2)], paused(), |a| attempt(a, &plan))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ConnectionRefused);
        let e = first_to_answer([], paused(), |a| attempt(a, &plan))
            .await
            .unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::NotFound);
    }
}
