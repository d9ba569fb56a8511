//! The `wasmbed` binary makes its data plane's system calls itself (`src/syscalls.rs`), not
//! through glibc's cancellation points: `build.rs` links it with `--wrap` for each. Checked on
//! the binary as built: for every `__wrap_` function in it, and for every cancellation point a
//! data plane calls, the C library's function of that name is not imported (a call that still
//! reached glibc would import it); and nothing in it can cancel a thread, which is what makes
//! skipping the cancellation points safe.
#![cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]

use object::{Object, ObjectSymbol};

/// A symbol's name without its version (`recv@GLIBC_2.2.5` is `recv`).
fn unversioned<'a>(s: &impl ObjectSymbol<'a>) -> Option<String> {
    let name = s.name().ok()?;
    Some(name.split('@').next().unwrap_or(name).to_string())
}

#[test]
fn the_binary_imports_none_of_the_functions_it_wraps() {
    let path = env!("CARGO_BIN_EXE_wasmbed");
    let data = std::fs::read(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    let file = object::File::parse(&*data).expect("the binary is an object file");
    let imports: Vec<String> = file
        .dynamic_symbols()
        .filter(|s| s.is_undefined())
        .filter_map(|s| unversioned(&s))
        .collect();
    let wrapped: Vec<String> = file
        .symbols()
        .filter(|s| s.is_definition())
        .filter_map(|s| unversioned(&s)?.strip_prefix("__wrap_").map(String::from))
        .collect();
    // The checks see something: the binary takes other functions from glibc, and has wrappers
    // (those of src/syscalls.rs).
    assert!(
        imports.iter().any(|i| i == "socket"),
        "no `socket` among {imports:?}"
    );
    assert!(!wrapped.is_empty(), "no __wrap_ function in the binary");
    let through_glibc: Vec<&String> = wrapped.iter().filter(|w| imports.contains(w)).collect();
    assert!(
        through_glibc.is_empty(),
        "the binary still calls glibc's {through_glibc:?}: build.rs's --wrap misses them"
    );
    // And the cancellation points a proxy's data plane may call, named here apart from
    // build.rs's list: one taken up by a dependency, or dropped from the list with its
    // `__wrap_`, is found.
    let data_plane = [
        "accept",
        "accept4",
        "close",
        "connect",
        "epoll_pwait",
        "epoll_wait",
        "read",
        "readv",
        "recv",
        "recvfrom",
        "recvmmsg",
        "recvmsg",
        "send",
        "sendmmsg",
        "sendmsg",
        "sendto",
        "splice",
        "write",
        "writev",
    ];
    let unwrapped: Vec<&&str> = data_plane
        .iter()
        .filter(|f| imports.iter().any(|i| i == *f))
        .collect();
    assert!(
        unwrapped.is_empty(),
        "the binary calls glibc's {unwrapped:?}: wrap them (build.rs, src/syscalls.rs)"
    );
    assert!(
        !imports.iter().any(|i| i == "pthread_cancel"),
        "the binary can cancel a thread: its system calls must keep glibc's cancellation points"
    );
}
