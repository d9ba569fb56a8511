//! route: which pools a device goes to, in order: the first route its SNI, ALPN and
//! certificate match, that route's fallbacks, then the default pool.

use wasmbed_config::RouteConfig;

use crate::clienthello::{Alpn, NO_ALPN};
use crate::context::{Context, Pools};

/// What a route may match about a device: its SNI, the ALPN protocols it offered, and (in
/// terminate mode) its certificate's attributes.
#[derive(Debug, Clone, Copy)]
pub struct Matched<'a> {
    pub sni: Option<&'a str>,
    pub alpn: &'a Alpn,
    pub cert: Option<&'a wasmbed_certs::CertAttributes>,
}

/// The pools a device goes to, in order: the first matching route's pool, its fallbacks, then
/// the default pool (a pool with no gateway taking sessions is skipped for the next).
pub(crate) fn pools_for(ctx: &Context, device: Matched<'_>) -> Pools {
    let routes = &ctx.config.routes;
    let matched = routes.iter().position(|r| route_matches(r, device));
    let index = matched.unwrap_or(routes.len());
    if let Some(counter) = ctx.routed.get(index) {
        counter.increment(1);
    }
    match ctx.route_pools.get(index) {
        Some(pools) => pools.clone(),
        None => crate::context::pools_of(matched.map(|i| &routes[i])),
    }
}

/// Whether a device matches a route: its SNI equals the route's or lies under its
/// `*.suffix`, it offers the route's ALPN protocol, its certificate carries the route's URI
/// SAN (exact, or `prefix*`) and OU; each only when the route names it.
pub fn route_matches(route: &RouteConfig, device: Matched<'_>) -> bool {
    let sni_ok = match (route.sni.as_deref(), device.sni) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(pattern), Some(sni)) => match pattern.strip_prefix("*.") {
            Some(suffix) => sni
                .strip_suffix(suffix)
                .is_some_and(|head| head.ends_with('.') && head.len() > 1),
            None => pattern == sni,
        },
    };
    let alpn_ok = route
        .alpn
        .as_deref()
        .is_none_or(|want| device.alpn.iter().any(|p| p == want.as_bytes()));
    let uri_ok = route.cert_uri.as_deref().is_none_or(|want| {
        device.cert.is_some_and(|c| {
            c.uris.iter().any(|u| match want.strip_suffix('*') {
                Some(prefix) => u.starts_with(prefix),
                None => u == want,
            })
        })
    });
    let ou_ok = route
        .cert_ou
        .as_deref()
        .is_none_or(|want| device.cert.is_some_and(|c| c.ous.iter().any(|o| o == want)));
    sni_ok && alpn_ok && uri_ok && ou_ok
}

/// The pools for a client whose TLS ended here: rustls negotiated ALPN, so routes match on
/// the SNI and the certificate's attributes (dropped once matched).
pub(crate) fn device_pools(
    ctx: &Context,
    sni: Option<&str>,
    attributes: Option<wasmbed_certs::CertAttributes>,
) -> Pools {
    let matched = Matched {
        sni,
        alpn: &NO_ALPN,
        cert: attributes.as_ref(),
    };
    pools_for(ctx, matched)
}
