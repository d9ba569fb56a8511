//! app call: the Wasm host. One `Engine` (pooling allocator, epoch interruption), one
//! `Linker`, an app registry of precompiled modules, one `Store` + instance per session, and
//! the limits every call runs under (deadline, memory cap).

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use wasmtime::{
    Caller, Config, Engine, ExternType, InstanceAllocationStrategy, InstancePre, Linker, Memory,
    Module, PoolingAllocationConfig, ResourceLimiter, Store, Trap, TypedFunc, UpdateDeadline,
    ValType,
};

/// How often the engine's epoch advances: the granularity of call deadlines, and how often a
/// long-running call yields to other sessions.
pub const TICK: Duration = Duration::from_millis(2);

/// Nanoseconds since the first call of this process: the clock a call's running is read on.
fn now_nanos() -> u64 {
    static BASE: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    u64::try_from(BASE.get_or_init(Instant::now).elapsed().as_nanos()).unwrap_or(u64::MAX)
}

/// Runs a call's future, noting when each poll of it begins in `slice`: the app's code runs
/// only inside those polls (a call yields at every epoch tick, and may then wait for the
/// thread while other sessions run), so the epoch callback counts from there to itself as
/// running and the wait before as nothing.
async fn running<F: std::future::Future>(slice: &AtomicU64, call: F) -> F::Output {
    let mut call = std::pin::pin!(call);
    std::future::poll_fn(|cx| {
        slice.store(now_nanos(), Ordering::Relaxed);
        call.as_mut().poll(cx)
    })
    .await
}

/// Most PUSH frames one call may send.
pub const MAX_PUSHES: usize = 64;

/// Why an application could not be loaded or uploaded.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("not valid WebAssembly: {0}")]
    Invalid(String),
    #[error("wrong ABI: {0}")]
    Abi(String),
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    #[error("invalid app name {0:?}: use letters, digits, '-', '_' (at most 64)")]
    Name(String),
}

/// Why one call into an application failed. The device gets ERROR with `code()`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    #[error("the application trapped: {0}")]
    Trap(String),
    #[error("the application ran past its deadline")]
    Timeout,
    #[error("the application went over its memory cap")]
    Memory,
    #[error("the application returned a bad pointer or length")]
    BadPointer,
    #[error("the host cannot make an instance now: {0}")]
    Unavailable(String),
    #[error("the application's state is {len} bytes, over the maximum of {max}")]
    StateTooLarge { len: usize, max: usize },
}

impl CallError {
    pub fn code(&self) -> wasmbed_protocol::ErrorCode {
        use wasmbed_protocol::ErrorCode;
        match self {
            CallError::Trap(_) | CallError::BadPointer | CallError::StateTooLarge { .. } => {
                ErrorCode::AppTrap
            }
            CallError::Timeout => ErrorCode::AppTimeout,
            CallError::Memory => ErrorCode::AppMemory,
            CallError::Unavailable(_) => ErrorCode::Unavailable,
        }
    }

    /// The `kind` label of the traps metric.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Trap(_) => "trap",
            CallError::Timeout => "timeout",
            CallError::Memory => "memory",
            CallError::BadPointer => "bad_pointer",
            CallError::Unavailable(_) => "unavailable",
            CallError::StateTooLarge { .. } => "state_too_large",
        }
    }

    fn from_wasm(e: wasmtime::Error) -> CallError {
        if e.downcast_ref::<MemoryCapExceeded>().is_some() {
            CallError::Memory
        } else if matches!(e.downcast_ref::<Trap>(), Some(Trap::Interrupt)) {
            CallError::Timeout
        } else {
            CallError::Trap(e.to_string())
        }
    }
}

#[derive(Debug, thiserror::Error)]
#[error("memory cap exceeded")]
struct MemoryCapExceeded;

/// Per-session data inside the store.
pub struct SessionState {
    max_memory: usize,
    /// How long the current call has run, and how long it may (`call_timeout`): a call's
    /// deadline counts its running, not the time it spends yielded, waiting for a busy
    /// host's CPU (a busy gateway is slow; its apps are not runaways).
    ran: Duration,
    call_timeout: Duration,
    /// When the current poll of the call began, or its last epoch callback ([`running`]).
    slice: Arc<AtomicU64>,
    max_push: usize,
    pushes: Vec<Vec<u8>>,
    pub device: String,
    pub app: String,
}

impl SessionState {
    /// An epoch tick at `now` ([`now_nanos`]) while the call runs: charges the slice since
    /// the poll began or the last tick, at most two ticks of it, and says whether the call
    /// goes on (yielding) or is stopped.
    fn tick(&mut self, now: u64) -> UpdateDeadline {
        let began = self.slice.swap(now, Ordering::Relaxed);
        // At most two ticks a slice: a thread the OS took away mid-call (an overloaded
        // host) is not held against the call for longer.
        self.ran += Duration::from_nanos(now.saturating_sub(began)).min(2 * TICK);
        if self.ran > self.call_timeout {
            UpdateDeadline::Interrupt
        } else {
            UpdateDeadline::Yield(1)
        }
    }
}

impl ResourceLimiter for SessionState {
    fn memory_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            return Err(wasmtime::Error::new(MemoryCapExceeded));
        }
        Ok(true)
    }

    fn table_growing(
        &mut self,
        _current: usize,
        desired: usize,
        _maximum: Option<usize>,
    ) -> wasmtime::Result<bool> {
        Ok(desired <= 10_000)
    }
}

/// A compiled application.
pub struct App {
    pub name: String,
    pub bytes: usize,
    /// SHA-256 of the module's bytes: tickets name the module they were sealed from.
    pub digest: [u8; 32],
    /// Whether it exports `snapshot` and `restore` (its state can move).
    pub stateful: bool,
    /// Calls of this app. Kept here, not in the metrics recorder, so that `/metrics` shows a
    /// series for every loaded app (from 0) and none for a deleted one; a replacement carries
    /// the count over.
    pub calls: std::sync::atomic::AtomicU64,
    pre: InstancePre<SessionState>,
    has_on_open: bool,
}

/// The limits of the host, from the gateway's settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub call_timeout: Duration,
    pub max_memory: usize,
    pub max_instances: u32,
    pub max_frame: usize,
    /// Largest app state `snapshot` may return.
    pub max_state: usize,
}

/// The Wasm host: engine, linker, registry.
pub struct Host {
    engine: Engine,
    linker: Linker<SessionState>,
    apps: RwLock<BTreeMap<String, Arc<App>>>,
    limits: Limits,
    ticking: Arc<AtomicBool>,
}

impl Drop for Host {
    fn drop(&mut self) {
        self.ticking.store(false, Ordering::Relaxed);
    }
}

impl Host {
    pub fn new(limits: Limits) -> Result<Host, AppError> {
        let mut config = Config::new();
        config.epoch_interruption(true);
        config.max_wasm_stack(256 << 10);
        config.async_stack_size(512 << 10);
        // Memories are capped, so each pooled slot reserves only the cap plus a guard page.
        config.memory_reservation(limits.max_memory as u64);
        config.memory_guard_size(64 << 10);
        config.memory_reservation_for_growth(0);
        let slots = limits.max_instances.saturating_add(16);
        let mut pool = PoolingAllocationConfig::default();
        pool.total_core_instances(slots)
            .total_memories(slots)
            .total_tables(slots)
            .total_stacks(slots)
            .max_memory_size(limits.max_memory);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        let engine = Engine::new(&config).map_err(|e| AppError::Invalid(e.to_string()))?;
        let mut linker = Linker::new(&engine);
        linker
            .func_wrap("wasmbed", "log", log)
            .and_then(|l| l.func_wrap("wasmbed", "send", send))
            .map_err(|e| AppError::Invalid(e.to_string()))?;
        let ticking = Arc::new(AtomicBool::new(true));
        let (e, t) = (engine.clone(), ticking.clone());
        std::thread::Builder::new()
            .name("wasm-epoch".into())
            .spawn(move || {
                while t.load(Ordering::Relaxed) {
                    std::thread::sleep(TICK);
                    e.increment_epoch();
                }
            })
            .map_err(|e| AppError::Invalid(format!("cannot start the epoch ticker: {e}")))?;
        Ok(Host {
            engine,
            linker,
            apps: RwLock::new(BTreeMap::new()),
            limits,
            ticking,
        })
    }

    /// Compiles and checks a module (binary or text) against the ABI.
    pub fn compile(&self, name: &str, bytes: &[u8]) -> Result<App, AppError> {
        check_name(name)?;
        let module =
            Module::new(&self.engine, bytes).map_err(|e| AppError::Invalid(format!("{e:#}")))?;
        check_abi(&module)?;
        let pre = self
            .linker
            .instantiate_pre(&module)
            .map_err(|e| AppError::Abi(format!("{e:#}")))?;
        let digest = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, bytes);
        let mut d = [0u8; 32];
        d.copy_from_slice(digest.as_ref());
        Ok(App {
            name: name.to_string(),
            bytes: bytes.len(),
            digest: d,
            stateful: module.get_export("snapshot").is_some(),
            calls: std::sync::atomic::AtomicU64::new(0),
            has_on_open: module.get_export("on_open").is_some(),
            pre,
        })
    }

    /// Adds or replaces an app; returns whether it replaced one.
    pub fn insert(&self, app: App) -> bool {
        let mut apps = self.apps.write().unwrap_or_else(|e| e.into_inner());
        if let Some(old) = apps.get(&app.name) {
            let so_far = old.calls.load(std::sync::atomic::Ordering::Relaxed);
            app.calls
                .fetch_add(so_far, std::sync::atomic::Ordering::Relaxed);
        }
        apps.insert(app.name.clone(), Arc::new(app)).is_some()
    }

    pub fn remove(&self, name: &str) -> bool {
        let mut apps = self.apps.write().unwrap_or_else(|e| e.into_inner());
        apps.remove(name).is_some()
    }

    pub fn get(&self, name: &str) -> Option<Arc<App>> {
        let apps = self.apps.read().unwrap_or_else(|e| e.into_inner());
        apps.get(name).cloned()
    }

    pub fn list(&self) -> Vec<Arc<App>> {
        let apps = self.apps.read().unwrap_or_else(|e| e.into_inner());
        apps.values().cloned().collect()
    }

    /// Loads every `NAME.wasm` and `NAME.wat` of `dir`. A bad file stops the load with an error
    /// naming it.
    pub fn load_dir(&self, dir: &Path) -> Result<usize, AppError> {
        let file_error = |path: &Path, problem: String| AppError::File {
            path: path.display().to_string(),
            problem,
        };
        let entries = std::fs::read_dir(dir).map_err(|e| file_error(dir, e.to_string()))?;
        let mut loaded = 0;
        for entry in entries.flatten() {
            let path = entry.path();
            let ext = path.extension().and_then(|e| e.to_str());
            let Some(stem) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            if !matches!(ext, Some("wasm" | "wat")) {
                continue;
            }
            let bytes = std::fs::read(&path).map_err(|e| file_error(&path, e.to_string()))?;
            let app = self
                .compile(stem, &bytes)
                .map_err(|e| file_error(&path, e.to_string()))?;
            self.insert(app);
            loaded += 1;
        }
        Ok(loaded)
    }

    /// A fresh instance of `app` in the place of `instance` (one that failed, in any state):
    /// the old one's pooled slot is freed first, so a renewal needs no slot beyond the
    /// session's own (the pool's 16 spare slots would not cover every trap at once at
    /// `--max-sessions`). On an error the instance is spent: the session ends.
    pub async fn renew(
        &self,
        instance: &mut Instance,
        app: &App,
        device: &str,
    ) -> Result<(), CallError> {
        // An empty store in its place: the old one, dropped, frees its instance's slot.
        let spent = SessionState {
            max_memory: 0,
            ran: Duration::ZERO,
            call_timeout: Duration::ZERO,
            slice: Arc::default(),
            max_push: 0,
            pushes: Vec::new(),
            device: String::new(),
            app: String::new(),
        };
        instance.store = Store::new(&self.engine, spent);
        *instance = self.instantiate(app, device).await?;
        Ok(())
    }

    /// A fresh instance of `app` for one session.
    pub async fn instantiate(&self, app: &App, device: &str) -> Result<Instance, CallError> {
        let slice = Arc::new(AtomicU64::new(0));
        let state = SessionState {
            max_memory: self.limits.max_memory,
            ran: Duration::ZERO,
            call_timeout: self.limits.call_timeout,
            slice: slice.clone(),
            max_push: self
                .limits
                .max_frame
                .saturating_sub(wasmbed_protocol::HEADER),
            pushes: Vec::new(),
            device: device.to_string(),
            app: app.name.clone(),
        };
        let mut store = Store::new(&self.engine, state);
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        // At each epoch tick while the app runs: `SessionState::tick` charges the slice and
        // stops the call past `call_timeout`, or yields to the other sessions. A wait for the
        // thread between polls is not counted (a busy gateway is slow; its apps are not
        // runaways).
        store.epoch_deadline_callback(|mut ctx| Ok(ctx.data_mut().tick(now_nanos())));
        store.data_mut().ran = Duration::ZERO;
        store.set_epoch_deadline(1);
        let instance = running(&slice, app.pre.instantiate_async(&mut store))
            .await
            .map_err(|e| match CallError::from_wasm(e) {
                CallError::Trap(t) => {
                    instantiation_failed(&app.name, &t);
                    CallError::Unavailable(t)
                }
                other => other,
            })?;
        let missing = |what: &str| CallError::Trap(format!("export {what} missing"));
        let memory = instance
            .get_memory(&mut store, "memory")
            .ok_or_else(|| missing("memory"))?;
        let alloc = instance
            .get_typed_func(&mut store, "alloc")
            .map_err(|_| missing("alloc"))?;
        let on_message = instance
            .get_typed_func(&mut store, "on_message")
            .map_err(|_| missing("on_message"))?;
        let state_funcs = if app.stateful {
            Some((
                instance
                    .get_typed_func(&mut store, "snapshot")
                    .map_err(|_| missing("snapshot"))?,
                instance
                    .get_typed_func(&mut store, "restore")
                    .map_err(|_| missing("restore"))?,
            ))
        } else {
            None
        };
        let on_open = if app.has_on_open {
            Some(
                instance
                    .get_typed_func(&mut store, "on_open")
                    .map_err(|_| missing("on_open"))?,
            )
        } else {
            None
        };
        Ok(Instance {
            store,
            memory,
            alloc,
            on_message,
            on_open,
            state_funcs,
            max_state: self.limits.max_state,
            slice,
        })
    }
}

/// An app's `snapshot` and `restore`.
type StateFuncs = (TypedFunc<(), i64>, TypedFunc<(i32, i32), ()>);

/// One session's instance of an application.
pub struct Instance {
    store: Store<SessionState>,
    memory: Memory,
    alloc: TypedFunc<i32, i32>,
    on_message: TypedFunc<(i32, i32), i64>,
    on_open: Option<TypedFunc<(), ()>>,
    /// `snapshot` and `restore`, when the app exports them.
    state_funcs: Option<StateFuncs>,
    max_state: usize,
    /// The store's [`SessionState::slice`], reachable while a call holds the store.
    slice: Arc<AtomicU64>,
}

/// What a call produced: the reply bytes and the pushes made during it.
#[derive(Debug, Default)]
pub struct Output {
    pub reply: Vec<u8>,
    pub pushes: Vec<Vec<u8>>,
}

impl Instance {
    fn arm(&mut self) {
        self.store.data_mut().ran = Duration::ZERO;
        self.store.set_epoch_deadline(1);
    }

    /// Runs `on_open`, if the app has one.
    pub async fn open(&mut self) -> Result<Output, CallError> {
        if self.on_open.is_some() {
            self.arm();
        }
        // Borrowed, not cloned: a `TypedFunc`'s clone takes the type registry's lock.
        if let Some(f) = &self.on_open {
            running(&self.slice, f.call_async(&mut self.store, ()))
                .await
                .map_err(CallError::from_wasm)?;
        }
        Ok(Output {
            reply: Vec::new(),
            pushes: std::mem::take(&mut self.store.data_mut().pushes),
        })
    }

    /// Whether the app can hand over its state (`snapshot`/`restore`).
    pub fn stateful(&self) -> bool {
        self.state_funcs.is_some()
    }

    /// The app's state, from `snapshot`, under the call deadline; at most `--max-state`
    /// bytes. `Ok(None)`: the app keeps no state it can hand over.
    pub async fn snapshot(&mut self) -> Result<Option<Vec<u8>>, CallError> {
        if self.state_funcs.is_none() {
            return Ok(None);
        }
        self.arm();
        let Some((snapshot, _)) = &self.state_funcs else {
            return Ok(None);
        };
        let packed = running(&self.slice, snapshot.call_async(&mut self.store, ()));
        let packed = packed.await;
        // A `send` outside a message has no REPLY to go before: nothing is pushed (ABI.md).
        self.store.data_mut().pushes.clear();
        let packed = packed.map_err(CallError::from_wasm)?;
        let (ptr, len) = ((packed as u64 >> 32) as usize, packed as u32 as usize);
        if len > self.max_state {
            return Err(CallError::StateTooLarge {
                len,
                max: self.max_state,
            });
        }
        let end = ptr.checked_add(len).ok_or(CallError::BadPointer)?;
        let bytes = self
            .memory
            .data(&self.store)
            .get(ptr..end)
            .ok_or(CallError::BadPointer)?
            .to_vec();
        Ok(Some(bytes))
    }

    /// Gives the app a state from `snapshot` (its own or an earlier version's): written
    /// through `alloc`, then `restore(ptr, len)`, each under the call deadline.
    pub async fn restore(&mut self, state: &[u8]) -> Result<(), CallError> {
        if self.state_funcs.is_none() {
            return Ok(());
        }
        let len = i32::try_from(state.len()).map_err(|_| CallError::BadPointer)?;
        let ptr = self.place(state, len).await?;
        self.arm();
        let Some((_, restore)) = &self.state_funcs else {
            return Ok(());
        };
        let restored = running(&self.slice, restore.call_async(&mut self.store, (ptr, len))).await;
        // As in `snapshot`: nothing pushed.
        self.store.data_mut().pushes.clear();
        restored.map_err(CallError::from_wasm)
    }

    /// Writes `data` where the app's `alloc` says; returns the pointer.
    async fn place(&mut self, data: &[u8], len: i32) -> Result<i32, CallError> {
        self.arm();
        let ptr = running(&self.slice, self.alloc.call_async(&mut self.store, len))
            .await
            .map_err(CallError::from_wasm)?;
        let at = usize::try_from(ptr).map_err(|_| CallError::BadPointer)?;
        if ptr == 0 && len > 0 {
            return Err(CallError::BadPointer);
        }
        self.memory
            .write(&mut self.store, at, data)
            .map_err(|_| CallError::BadPointer)?;
        Ok(ptr)
    }

    /// Hands one message to `on_message`.
    pub async fn message(&mut self, data: &[u8]) -> Result<Output, CallError> {
        let len = i32::try_from(data.len()).map_err(|_| CallError::BadPointer)?;
        let ptr = self.place(data, len).await?;
        self.arm();
        let packed = running(
            &self.slice,
            self.on_message.call_async(&mut self.store, (ptr, len)),
        )
        .await
        .map_err(CallError::from_wasm)?;
        let reply = if packed == 0 {
            Vec::new()
        } else {
            let (out_ptr, out_len) = ((packed as u64 >> 32) as usize, packed as u32 as usize);
            let end = out_ptr.checked_add(out_len).ok_or(CallError::BadPointer)?;
            let max = self.store.data().max_push;
            if out_len > max {
                return Err(CallError::BadPointer);
            }
            self.memory
                .data(&self.store)
                .get(out_ptr..end)
                .ok_or(CallError::BadPointer)?
                .to_vec()
        };
        Ok(Output {
            reply,
            pushes: std::mem::take(&mut self.store.data_mut().pushes),
        })
    }
}

fn guest_bytes(
    caller: &mut Caller<'_, SessionState>,
    ptr: i32,
    len: i32,
) -> wasmtime::Result<Vec<u8>> {
    let memory = caller
        .get_export("memory")
        .and_then(|e| e.into_memory())
        .ok_or_else(|| wasmtime::Error::msg("no exported memory"))?;
    let (start, len) = (ptr as u32 as usize, len as u32 as usize);
    memory
        .data(&caller)
        .get(start..start.saturating_add(len))
        .map(<[u8]>::to_vec)
        .ok_or_else(|| wasmtime::Error::msg("pointer out of bounds"))
}

fn log(mut caller: Caller<'_, SessionState>, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let bytes = guest_bytes(&mut caller, ptr, len.min(4096))?;
    let s = caller.data();
    tracing::info!(device = %s.device, app = %s.app, "{}", String::from_utf8_lossy(&bytes));
    Ok(())
}

fn send(mut caller: Caller<'_, SessionState>, ptr: i32, len: i32) -> wasmtime::Result<()> {
    let max = caller.data().max_push;
    if len as u32 as usize > max || caller.data().pushes.len() >= MAX_PUSHES {
        return Err(wasmtime::Error::msg("send: too large or too many pushes"));
    }
    let bytes = guest_bytes(&mut caller, ptr, len)?;
    caller.data_mut().pushes.push(bytes);
    Ok(())
}

fn check_name(name: &str) -> Result<(), AppError> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(AppError::Name(name.to_string()))
    }
}

/// Checks the exports the ABI needs (gateway/ABI.md); imports are checked by the linker.
fn check_abi(module: &Module) -> Result<(), AppError> {
    let func = |name: &str, params: &[&str], results: &[&str], required: bool| match module
        .get_export(name)
    {
        Some(ExternType::Func(f)) => {
            let p: Vec<&str> = f.params().map(|t| type_name(&t)).collect();
            let r: Vec<&str> = f.results().map(|t| type_name(&t)).collect();
            if p == params && r == results {
                Ok(())
            } else {
                Err(AppError::Abi(format!(
                    "export {name} has type ({}) -> ({}), expected ({}) -> ({})",
                    p.join(", "),
                    r.join(", "),
                    params.join(", "),
                    results.join(", ")
                )))
            }
        }
        Some(_) => Err(AppError::Abi(format!("export {name} is not a function"))),
        None if required => Err(AppError::Abi(format!("missing export {name}"))),
        None => Ok(()),
    };
    match module.get_export("memory") {
        Some(ExternType::Memory(_)) => {}
        _ => return Err(AppError::Abi("missing export memory".into())),
    }
    func("alloc", &["i32"], &["i32"], true)?;
    func("on_message", &["i32", "i32"], &["i64"], true)?;
    func("snapshot", &[], &["i64"], false)?;
    func("restore", &["i32", "i32"], &[], false)?;
    let snapshot = module.get_export("snapshot").is_some();
    let restore = module.get_export("restore").is_some();
    if snapshot != restore {
        return Err(AppError::Abi(
            "export snapshot and restore together, or neither".into(),
        ));
    }
    func("on_open", &[], &[], false)
}

fn type_name(t: &ValType) -> &'static str {
    match t {
        ValType::I32 => "i32",
        ValType::I64 => "i64",
        ValType::F32 => "f32",
        ValType::F64 => "f64",
        ValType::V128 => "v128",
        ValType::Ref(_) => "ref",
    }
}

#[cfg(test)]
mod tests;

/// Logs a failed instantiation, at most once every 10 s (the devices are told with ERROR
/// `unavailable` each time): out of pooled slots, memory or memory mappings, or an app
/// whose start traps.
fn instantiation_failed(app: &str, error: &str) {
    static LAST: AtomicU64 = AtomicU64::new(0);
    static SINCE: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let last = LAST.load(Ordering::Relaxed);
    if now >= last + 10
        && LAST
            .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
            .is_ok()
    {
        let more = SINCE.swap(0, Ordering::Relaxed);
        tracing::warn!(
            app,
            error,
            more_since_last_log = more,
            "cannot instantiate the app: sessions get ERROR unavailable (if the error is about \
             memory or mmap, see vm.max_map_count in docs/gateway.md)"
        );
    } else {
        SINCE.fetch_add(1, Ordering::Relaxed);
    }
}
