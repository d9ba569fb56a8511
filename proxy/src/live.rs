//! live: the running proxy's changeable state — the config in force (an `ArcSwap` of the
//! session [`Context`]), the health probes, and the reload that re-reads the config file and
//! applies the difference (SIGHUP, `POST /api/reload`).
//!
//! A reload is all or nothing: the new file is parsed and validated, the TLS files it names
//! are read and checked, and only then is anything changed. Sessions keep the context they
//! started with; new sessions take the new one. Gateways of the file are added (probed, in
//! slow start), removed (drained: their sessions move in terminate mode), replaced (a new
//! address) or re-weighted in place. Gateways found in DNS are not the file's, and a reload
//! leaves them alone. Changes made through the admin API (a gateway removed, added or
//! drained) are kept across reloads until the file itself changes that gateway; then the
//! file wins, and the reload's answer says so (HAProxy's `server-state-file`, built in).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use arc_swap::ArcSwap;
use metrics::counter;
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use wasmbed_config::{GatewayConfig, HealthConfig, ProxyConfig};

use crate::balancer::{Gateway, Origin};
use crate::context::Context;
use crate::error::ProxyError;

/// Reads the config again as at start (the file, with the same flags laid over it).
pub type ConfigSource = Box<dyn Fn() -> Result<ProxyConfig, String> + Send + Sync>;

/// The running proxy's changeable state.
pub struct Live {
    current: ArcSwap<Context>,
    source: OnceLock<ConfigSource>,
    pub(crate) probes: Probes,
    /// One reload at a time.
    lock: Mutex<()>,
    /// Bumped by every applied reload (discovery re-reads its targets).
    pub(crate) generation: tokio::sync::watch::Sender<u64>,
    /// Gateways removed through the admin API, each with the file's entry for it at the
    /// time (`None`: the file did not list it): a reload keeps them out while the file's
    /// entry stays as it was.
    removed_at_run_time: Mutex<HashMap<String, Option<GatewayConfig>>>,
    /// The admin endpoint's client CA as read at the start, held apart from the devices' CA
    /// at each reload ([`wasmbed_admin::check_apart`]).
    pub(crate) admin_ca: OnceLock<Vec<rustls::pki_types::CertificateDer<'static>>>,
}

/// The health probe tasks: one generation at a time, restarted whole when the health
/// settings change.
pub(crate) struct Probes {
    pub(crate) tracker: TaskTracker,
    /// The control thread they run on (with the admin endpoint).
    pub(crate) control: crate::control::Control,
    stop: CancellationToken,
    generation: Mutex<CancellationToken>,
}

impl Probes {
    fn new(stop: CancellationToken, control: crate::control::Control) -> Probes {
        Probes {
            tracker: TaskTracker::new(),
            control,
            generation: Mutex::new(stop.child_token()),
            stop,
        }
    }

    /// Starts probing `gateways` with `health`, in the current generation.
    pub(crate) fn start(&self, gateways: &[Arc<Gateway>], health: &HealthConfig) {
        let generation = self
            .generation
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let on = self.control.handle();
        crate::health::spawn(gateways, health, (&self.tracker, on), &generation);
        // Beside http probes, the liveness watch finds a dead gateway process at once.
        for g in gateways {
            if health.watch
                && crate::health::kind_for(health.check, g) == wasmbed_config::HealthCheck::Http
                && g.health_addr.is_some()
            {
                let (g, c, s) = (g.clone(), health.clone(), generation.clone());
                self.tracker.spawn_on(crate::alive::watch(g, c, s), on);
            }
        }
    }

    /// Stops every probe and starts them again with `health`.
    fn restart(&self, gateways: &[Arc<Gateway>], health: &HealthConfig) {
        {
            let mut generation = self.generation.lock().unwrap_or_else(|e| e.into_inner());
            generation.cancel();
            *generation = self.stop.child_token();
        }
        self.start(gateways, health);
    }
}

/// Changes made through the admin API that the config file does not hold, as a process
/// that is taken over (`--takeover`) hands them to the new one.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunTimeChanges {
    /// Removed at run time, with the file's entry for it then (`None`: it was not the file's).
    pub removed: Vec<(String, Option<GatewayConfig>)>,
    /// Added at run time.
    pub added: Vec<GatewayConfig>,
    /// Drained at run time (the file's or added ones), at the address they had.
    pub drained: Vec<GatewayConfig>,
}

/// What a reload changed.
#[derive(Debug, Default, Serialize, PartialEq, Eq)]
pub struct ReloadReport {
    /// Gateways that joined (probed, in slow start).
    pub added: Vec<String>,
    /// Gateways that left (drained: their sessions move in terminate mode).
    pub removed: Vec<String>,
    /// Gateways whose address, health address or pool changed: replaced by a new one.
    pub replaced: Vec<String>,
    /// Gateways whose weight changed in place.
    pub reweighted: Vec<String>,
    /// The health probes were restarted with new settings.
    pub health_restarted: bool,
    /// Settings that changed in the file but take effect only at the next start; the
    /// running values stay.
    pub restart_needed: Vec<&'static str>,
    /// Device certificates revoked by the CRLs now in force.
    pub revoked_serials: usize,
    /// Run-time changes (admin API) the reload kept: `b: removed at run time`, `c: drained
    /// at run time`, `d: added at run time`.
    pub kept: Vec<String>,
    /// Run-time changes the file overrode, because it changed that gateway itself.
    pub overridden: Vec<String>,
}

impl Live {
    pub(crate) fn new(
        ctx: Context,
        stop: CancellationToken,
        control: crate::control::Control,
    ) -> Live {
        Live {
            current: ArcSwap::from_pointee(ctx),
            source: OnceLock::new(),
            probes: Probes::new(stop, control),
            lock: Mutex::new(()),
            generation: tokio::sync::watch::Sender::new(0),
            removed_at_run_time: Mutex::new(HashMap::new()),
            admin_ca: OnceLock::new(),
        }
    }

    /// `DELETE /api/gateways/{name}`: removes the gateway and remembers that it was removed
    /// at run time, so that reloads keep it out until the file changes its entry.
    pub fn remove_gateway(&self, name: &str) -> Option<Arc<Gateway>> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = self.context();
        let g = remove(&ctx.gateways, name)?;
        let in_file = ctx.config.gateways.iter().find(|c| c.name == name).cloned();
        self.removed_at_run_time
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(name.to_string(), in_file);
        Some(g)
    }

    /// Whether the gateway named `name` was removed at run time (`DELETE`) and is kept out:
    /// DNS discovery does not bring it back (it is found again under that name).
    pub fn removed_at_run_time(&self, name: &str) -> bool {
        self.removed_at_run_time
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(name)
    }

    /// `POST /api/gateways`: adds a gateway (a name removed at run time is forgotten as such),
    /// held to the health check in use and probed with it: all under the lock a reload
    /// takes, so a reload comes wholly before (the gateway held to its check) or wholly after
    /// (its restart of the probes takes this one's too). Done in two steps, a reload between
    /// them left it two probers, or one of the check before. `Ok(None)`: a gateway of that
    /// name exists; `Err`: the health check in use cannot probe it.
    pub fn add_gateway(&self, config: &GatewayConfig) -> Result<Option<Arc<Gateway>>, String> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let ctx = self.context();
        let health = &ctx.config.health;
        wasmbed_config::proxy::validate::health_target("gateway", health.check, config)
            .map_err(|e| e.to_string())?;
        let probed = health.check != wasmbed_config::HealthCheck::None;
        let Some(g) = ctx
            .gateways
            .add_from(config, crate::balancer::Origin::Api, probed)
        else {
            return Ok(None);
        };
        self.removed_at_run_time
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&config.name);
        self.probes.start(std::slice::from_ref(&g), health);
        Ok(Some(g))
    }

    /// The admin API's changes in force — gateways removed, added or drained at run time —
    /// for the process that takes this one over (`--takeover`), which keeps them as a reload
    /// keeps them ([`Live::adopt_run_time_changes`]).
    pub fn run_time_changes(&self) -> RunTimeChanges {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let removed = self
            .removed_at_run_time
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .map(|(name, then)| (name.clone(), then.clone()))
            .collect();
        let mut changes = RunTimeChanges {
            removed,
            ..RunTimeChanges::default()
        };
        for g in self.context().gateways.snapshot().iter() {
            // Gateways found in DNS are the new process's discovery's to find again.
            if matches!(g.origin, Origin::Dns(_)) {
                continue;
            }
            if g.origin == Origin::Api {
                changes.added.push(g.config());
            }
            if g.drained_here() {
                changes.drained.push(g.config());
            }
        }
        changes
    }

    /// In a process that took over (`--takeover`), before it serves its admin endpoint: the
    /// old process's run-time changes, kept as a reload keeps them — unless this process's
    /// file now says otherwise of that gateway (a removed one whose entry changed, an added
    /// name the file lists, a drained one at another address). Returns what was kept, one
    /// line each, and the gateways added (probed already, as `POST /api/gateways` does).
    pub fn adopt_run_time_changes(
        &self,
        changes: RunTimeChanges,
    ) -> (Vec<String>, Vec<Arc<Gateway>>) {
        let ctx = self.context();
        let in_file = |name: &str| ctx.config.gateways.iter().find(|c| c.name == name).cloned();
        let mut kept = Vec::new();
        for (name, then) in changes.removed {
            if in_file(&name) == then && self.remove_gateway(&name).is_some() {
                kept.push(format!("{name}: removed at run time"));
            }
        }
        let mut added = Vec::new();
        for c in changes.added {
            if in_file(&c.name).is_some() {
                continue;
            }
            match self.add_gateway(&c) {
                Ok(Some(g)) => {
                    kept.push(format!("{}: added at run time", c.name));
                    added.push(g);
                }
                Ok(None) => {}
                Err(why) => {
                    tracing::warn!(gateway = %c.name, why, "takeover: a gateway added at run time is not kept")
                }
            }
        }
        for c in changes.drained {
            if let Some(g) = ctx.gateways.find(&c.name)
                && g.same_endpoint(&c)
            {
                g.set_draining(true);
                kept.push(format!("{}: drained at run time", c.name));
            }
        }
        (kept, added)
    }

    /// The context new sessions start with.
    pub fn context(&self) -> Arc<Context> {
        self.current.load_full()
    }

    /// Sets where [`Live::reload`] reads the config from (once).
    pub fn set_source(&self, source: ConfigSource) {
        let _ = self.source.set(source);
    }

    /// Re-reads the config (the file and the flags) and applies it; on an error the running
    /// config stays whole and the error says why in one line. Without a source (an embedding
    /// program that gave none) only the device TLS files are re-read.
    pub fn reload(&self) -> Result<ReloadReport, ProxyError> {
        let result = match self.source.get() {
            Some(source) => source()
                .map_err(|e| ProxyError::Reload(e.replace('\n', " ")))
                .and_then(|config| self.apply(config)),
            None => {
                let ctx = self.context();
                ctx.device_tls.reload().map(|()| ReloadReport {
                    revoked_serials: ctx.device_tls.revoked_serials(),
                    ..ReloadReport::default()
                })
            }
        };
        let label = if result.is_ok() { "ok" } else { "error" };
        counter!(crate::metric_names::CONFIG_RELOADS, "result" => label).increment(1);
        match &result {
            Ok(report) => {
                tracing::info!(?report, "config reloaded");
                let text = format!(
                    "config reloaded: {} added, {} removed, {} replaced, {} re-weighted; \
                     run-time changes kept: {}; overridden by the file: {}",
                    report.added.len(),
                    report.removed.len(),
                    report.replaced.len(),
                    report.reweighted.len(),
                    list_or_none(&report.kept),
                    list_or_none(&report.overridden),
                );
                crate::events::event("reload", None, text);
            }
            Err(e) => {
                tracing::warn!(error = %e, "config not reloaded; the running one stays");
                crate::events::event("reload_failed", None, format!("config not reloaded: {e}"));
            }
        }
        result
    }

    /// Applies `new` (already validated) as the running config.
    pub fn apply(&self, mut new: ProxyConfig) -> Result<ReloadReport, ProxyError> {
        let _one = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        let old_ctx = self.context();
        let old = &old_ctx.config;
        let mut report = ReloadReport::default();
        keep_restart_only(old, &mut new, &mut report.restart_needed);
        // Everything that can fail, first. The admin endpoint's CA (kept: restart-only) stays
        // apart from the devices' CA as the reload reads it, as at the start.
        let device_cas: Vec<&std::path::Path> = new
            .tls
            .iter()
            .filter_map(|t| t.client_ca.as_deref())
            .collect();
        let admin_ca = self.admin_ca.get().map_or(&[][..], Vec::as_slice);
        wasmbed_admin::check_apart(new.admin_auth.tls.as_ref(), admin_ca, &device_cas)?;
        let tls = old_ctx.device_tls.prepare(crate::tls::of(&new))?;
        // Gateways added at run time and kept (below) are held to the new health check as the
        // file's are: an `http` check needs a health address (else each would be probed on its
        // data port and marked down).
        for g in old_ctx.gateways.snapshot().iter() {
            let kept = g.origin == Origin::Api && !new.gateways.iter().any(|c| c.name == g.name);
            if !kept {
                continue;
            }
            let config = GatewayConfig {
                name: g.name.clone(),
                addr: g.addr.clone(),
                health_addr: g.health_addr.clone(),
                weight: g.weight(),
                pool: g.pool.clone(),
            };
            let field = format!("gateway {:?} (added at run time)", g.name);
            wasmbed_config::proxy::validate::health_target(&field, new.health.check, &config)
                .map_err(|e| ProxyError::Reload(e.to_string()))?;
        }
        let connector = crate::tls::connector(&new)?;
        let link_client = match &old_ctx.links {
            Some(_) => Some(crate::link::client_config(&new)?),
            None => None,
        };
        if let Some(warning) = wasmbed_config::hard_stop_warning(new.grace, new.hard_stop_after) {
            tracing::warn!("{warning}");
        }
        // Then the changes.
        if let (Some(links), Some(client)) = (&old_ctx.links, link_client) {
            links.set_trust(client);
        }
        report.revoked_serials = old_ctx.device_tls.install(tls);
        old_ctx.device_tls.set_cap(new.max_handshakes);
        old_ctx.gateways.set_slow_start(new.slow_start);
        let health_changed = new.health != old.health;
        let ctx = Arc::new(old_ctx.next(new, connector));
        self.current.store(ctx.clone());
        let gateways = &ctx.gateways;
        let mut started = Vec::new();
        let listed = &ctx.config.gateways;
        let in_file = |config: &ProxyConfig, name: &str| -> Option<GatewayConfig> {
            config.gateways.iter().find(|c| c.name == name).cloned()
        };
        // Removed at run time: kept out while the file's entry is what it was then.
        let mut removed = self
            .removed_at_run_time
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        removed.retain(|name, then| {
            if in_file(&ctx.config, name) == *then {
                report.kept.push(format!("{name}: removed at run time"));
                true
            } else {
                report
                    .overridden
                    .push(format!("{name}: removed at run time; the file changed it"));
                false
            }
        });
        for g in gateways.snapshot().iter() {
            if g.origin == Origin::Api {
                // Added at run time: kept unless the file now says something else of it.
                let (was, now) = (in_file(old, &g.name), in_file(&ctx.config, &g.name));
                if now.is_some() && was != now {
                    remove(gateways, &g.name);
                    let text = format!("{}: added at run time; the file now lists it", g.name);
                    report.overridden.push(text);
                } else {
                    report.kept.push(format!("{}: added at run time", g.name));
                }
                continue;
            }
            if g.origin != Origin::Config {
                continue;
            }
            match listed.iter().find(|c| c.name == g.name) {
                None => {
                    remove(gateways, &g.name);
                    report.removed.push(g.name.clone());
                }
                Some(c) if !g.same_endpoint(c) => {
                    remove(gateways, &g.name);
                    report.replaced.push(g.name.clone());
                    if g.drained_here() {
                        let text = format!("{}: drained at run time; the file replaced it", g.name);
                        report.overridden.push(text);
                    }
                }
                Some(c) => {
                    if g.weight() != c.weight {
                        g.set_weight(c.weight);
                        report.reweighted.push(g.name.clone());
                    }
                    if g.drained_here() {
                        report.kept.push(format!("{}: drained at run time", g.name));
                    }
                }
            }
        }
        for c in listed {
            if gateways.find(&c.name).is_some() || removed.contains_key(&c.name) {
                continue;
            }
            let probed = ctx.config.health.check != wasmbed_config::HealthCheck::None;
            if let Some(g) = gateways.add_from(c, Origin::Config, probed) {
                if !report.replaced.contains(&c.name) {
                    report.added.push(c.name.clone());
                }
                started.push(g);
            }
        }
        if health_changed {
            self.probes
                .restart(&gateways.snapshot(), &ctx.config.health);
            report.health_restarted = true;
        } else {
            self.probes.start(&started, &ctx.config.health);
        }
        self.generation.send_modify(|n| *n += 1);
        Ok(report)
    }
}

fn list_or_none(items: &[String]) -> String {
    if items.is_empty() {
        "none".into()
    } else {
        items.join(", ")
    }
}

/// Copies the running values of settings a reload cannot change into `new`, naming those
/// the file changed.
fn keep_restart_only(old: &ProxyConfig, new: &mut ProxyConfig, changed: &mut Vec<&'static str>) {
    fn keep<T: PartialEq + Clone>(
        name: &'static str,
        old: &T,
        new: &mut T,
        changed: &mut Vec<&'static str>,
    ) {
        if old != new {
            changed.push(name);
            *new = old.clone();
        }
    }
    keep("mode", &old.mode, &mut new.mode, changed);
    keep("listener", &old.listeners, &mut new.listeners, changed);
    keep("admin", &old.admin, &mut new.admin, changed);
    keep(
        "admin_token_file/admin_tls",
        &old.admin_auth,
        &mut new.admin_auth,
        changed,
    );
    keep("threads", &old.threads, &mut new.threads, changed);
    keep(
        "max_connections",
        &old.max_connections,
        &mut new.max_connections,
        changed,
    );
    keep("log_format", &old.log_format, &mut new.log_format, changed);
    keep("upstream", &old.upstream, &mut new.upstream, changed);
    keep(
        "link_timeout",
        &old.link_timeout,
        &mut new.link_timeout,
        changed,
    );
    // The QUIC listener's address and its transport (idle timeout) are set at bind;
    // `quic_retry` is read live; `max_handshakes` is applied by `apply` (`DeviceTls::set_cap`).
    keep(
        "quic_listen",
        &old.quic.listen,
        &mut new.quic.listen,
        changed,
    );
    keep(
        "quic_idle_timeout",
        &old.quic.idle_timeout,
        &mut new.quic.idle_timeout,
        changed,
    );
}

/// Takes the gateway `name` out of the set: no new sessions, its prober stops, its live
/// sessions move (terminate mode) or end on their own (passthrough). Shared by `DELETE
/// /api/gateways/{name}`, reloads and discovery.
pub fn remove(gateways: &crate::balancer::GatewaySet, name: &str) -> Option<Arc<Gateway>> {
    // Its live series leave `/metrics` with it (`metrics::render`).
    let g = gateways.remove(name)?;
    tracing::info!(gateway = %g.name, sessions = g.sessions(), origin = g.origin.as_str(), "gateway removed");
    crate::events::event(
        "removed",
        Some(&g.name),
        format!("{} removed ({} sessions)", g.name, g.sessions()),
    );
    Some(g)
}
