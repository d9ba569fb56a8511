//! Links the `wasmbed` binary with `--wrap` for the system calls `src/syscalls.rs` makes
//! without glibc's cancellation bookkeeping (its documentation says why), on x86-64 Linux with
//! glibc; elsewhere the binary calls the C library's functions as they are.

/// The C library functions wrapped: each has its `__wrap_` in `src/syscalls.rs`.
const WRAPPED: &[&str] = &[
    "accept4",
    "close",
    "connect",
    "epoll_wait",
    "read",
    "recv",
    "recvfrom",
    "recvmmsg",
    "recvmsg",
    "send",
    "sendmsg",
    "sendto",
    "splice",
    "write",
    "writev",
];

fn main() {
    println!("cargo::rerun-if-changed=build.rs");
    println!("cargo::rustc-check-cfg=cfg(wrapped_syscalls)");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    let wrapped = var("CARGO_CFG_TARGET_OS") == "linux"
        && var("CARGO_CFG_TARGET_ARCH") == "x86_64"
        && var("CARGO_CFG_TARGET_ENV") == "gnu"
        // Not x32 (`x86_64-unknown-linux-gnux32`): its 32-bit words would leave the upper halves
        // of the system call's registers undefined.
        && var("CARGO_CFG_TARGET_POINTER_WIDTH") == "64";
    if wrapped {
        println!("cargo::rustc-cfg=wrapped_syscalls");
        for function in WRAPPED {
            println!("cargo::rustc-link-arg-bins=-Wl,--wrap={function}");
        }
    }
}
