//! The C API from the outside, as C calls it: memory and its errors, null pointers, and one
//! session's bytes and events through raw pointers.

use std::ffi::CString;
use std::ptr;

use wasmbed_device_c::*;
use wasmbed_protocol::{Frame, Kind, Welcome};

fn config(device: &CString, app: &CString) -> WasmbedConfig {
    let mut c = std::mem::MaybeUninit::<WasmbedConfig>::uninit();
    // SAFETY: a writable config and NUL-terminated names that outlive its use.
    unsafe { wasmbed_config_init(c.as_mut_ptr(), device.as_ptr(), app.as_ptr()) };
    // SAFETY: just written.
    unsafe { c.assume_init() }
}

/// 8-aligned memory.
fn memory(bytes: usize) -> Vec<u64> {
    vec![0u64; bytes.div_ceil(8)]
}

#[test]
fn the_default_session_needs_what_the_docs_say() {
    let (device, app) = (
        CString::new("device-0000").unwrap(),
        CString::new("counter").unwrap(),
    );
    let c = config(&device, &app);
    // SAFETY: a valid config.
    let need = unsafe { wasmbed_session_memory(&c) };
    // docs/devices.md: window 4,096 + frame 4 + 2,048 + HELLO with a 1 KiB ticket 13 + 1,066
    // + names 18 + the handle.
    let handle = need - (4096 + 2052 + 1079 + 18);
    println!("session memory with the defaults: {need} bytes (handle {handle})");
    #[cfg(target_pointer_width = "64")]
    assert_eq!(
        (need, handle),
        (7781, 536),
        "the figures docs/devices.md gives"
    );
    let mut mem = memory(need);
    let mut r = WasmbedResult::Ok;
    // SAFETY: memory valid for `need` bytes (the Vec outlives the handle), 8-aligned.
    let s = unsafe { wasmbed_session_init(mem.as_mut_ptr().cast(), need, &c, &mut r) };
    assert!(!s.is_null(), "{r:?}");
    // One byte short, misaligned, null: each refused by name.
    // SAFETY: as above; the calls read at most `len` bytes.
    unsafe {
        let mut m2 = memory(need);
        assert!(wasmbed_session_init(m2.as_mut_ptr().cast(), need - 1, &c, &mut r).is_null());
        assert_eq!(r, WasmbedResult::Memory);
        assert!(
            wasmbed_session_init(m2.as_mut_ptr().cast::<u8>().add(1), need - 8, &c, &mut r)
                .is_null()
        );
        assert_eq!(r, WasmbedResult::Alignment);
        assert!(wasmbed_session_init(ptr::null_mut(), need, &c, &mut r).is_null());
        assert_eq!(r, WasmbedResult::Null);
        let empty = CString::new("").unwrap();
        let bad = config(&empty, &app);
        assert!(wasmbed_session_init(m2.as_mut_ptr().cast(), need, &bad, &mut r).is_null());
        assert_eq!(r, WasmbedResult::Config);
        assert_eq!(wasmbed_session_status(ptr::null_mut()), WasmbedStatus::Done);
        assert_eq!(
            wasmbed_session_send_data(ptr::null_mut(), ptr::null(), 0, ptr::null_mut()),
            WasmbedResult::Null
        );
    }
}

/// A config no memory could hold, or one `wasmbed_session_init` refuses, needs 0 bytes, as
/// the header says (no sum that wraps around to a small size).
#[test]
fn a_config_that_cannot_make_a_session_needs_no_memory() {
    let (device, app) = (
        CString::new("device-0000").unwrap(),
        CString::new("counter").unwrap(),
    );
    let empty = CString::new("").unwrap();
    let mut huge = config(&device, &app);
    huge.window = usize::MAX;
    let mut small = config(&device, &app);
    small.window = 3;
    for c in [huge, small, config(&empty, &app)] {
        // SAFETY: a valid config.
        assert_eq!(unsafe { wasmbed_session_memory(&c) }, 0);
    }
}

#[test]
fn a_session_through_raw_pointers() {
    let (device, app) = (CString::new("d1").unwrap(), CString::new("echo").unwrap());
    let c = config(&device, &app);
    // SAFETY: as in the test above, for the whole test: `mem` outlives `s`.
    unsafe {
        let need = wasmbed_session_memory(&c);
        let mut mem = memory(need);
        let s = wasmbed_session_init(mem.as_mut_ptr().cast(), need, &c, ptr::null_mut());
        assert_eq!(wasmbed_session_status(s), WasmbedStatus::Connect);
        wasmbed_session_connected(s, 0);
        let mut seq = 0u64;
        assert_eq!(
            wasmbed_session_send_data(s, b"hi".as_ptr(), 2, &mut seq),
            WasmbedResult::Ok
        );
        assert_eq!(seq, 1);
        let mut out = ptr::null();
        let n = wasmbed_session_poll_send(s, &mut out);
        let hello = std::slice::from_raw_parts(out, n).to_vec();
        assert_eq!(hello[4], Kind::Hello as u8);
        wasmbed_session_sent(s, n);
        let welcome = Frame::control(
            Kind::Welcome,
            0,
            &Welcome {
                session: "s".into(),
                gateway: "gw-7".into(),
                resumed: None,
                resume_refused: None,
            },
        );
        let bytes = welcome.encode();
        let taken = wasmbed_session_feed(s, bytes.as_ptr(), bytes.len(), 1);
        assert_eq!(taken, bytes.len());
        let mut e = std::mem::MaybeUninit::<WasmbedEvent>::uninit();
        assert!(wasmbed_session_poll_event(s, e.as_mut_ptr()));
        let ev = e.assume_init_read();
        assert_eq!(ev.kind, WasmbedEventKind::Welcome);
        assert_eq!(std::slice::from_raw_parts(ev.data, ev.len), b"gw-7");
        assert!(!wasmbed_session_poll_event(s, e.as_mut_ptr()));
        // The DATA goes after WELCOME; then its REPLY.
        let n = wasmbed_session_poll_send(s, &mut out);
        assert_eq!(n, 13 + 2);
        wasmbed_session_sent(s, n);
        let bytes = Frame::new(Kind::Reply, 1, b"ok".to_vec()).encode();
        assert_eq!(
            wasmbed_session_feed(s, bytes.as_ptr(), bytes.len(), 2),
            bytes.len()
        );
        assert!(wasmbed_session_poll_event(s, e.as_mut_ptr()));
        let ev = e.assume_init_read();
        assert_eq!((ev.kind, ev.seq), (WasmbedEventKind::Reply, 1));
        assert_eq!(std::slice::from_raw_parts(ev.data, ev.len), b"ok");
        assert!(!wasmbed_session_poll_event(s, e.as_mut_ptr()));
        assert_eq!(wasmbed_session_owed(s), 0);
    }
}

#[test]
fn bytes_from_the_sessions_own_memory_are_refused() {
    let (device, app) = (CString::new("d1").unwrap(), CString::new("echo").unwrap());
    let c = config(&device, &app);
    // SAFETY: as in the tests above.
    unsafe {
        let need = wasmbed_session_memory(&c);
        let mut mem = memory(need);
        let base = mem.as_mut_ptr().cast::<u8>();
        let s = wasmbed_session_init(base, need, &c, ptr::null_mut());
        let inside = base.add(need - 16);
        assert_eq!(
            wasmbed_session_send_data(s, inside, 8, ptr::null_mut()),
            WasmbedResult::Overlap
        );
        assert_eq!(wasmbed_session_feed(s, inside, 8, 0), 0);
        assert!(!wasmbed_session_restore(s, 1, inside, 8));
        assert_eq!(
            wasmbed_session_send_data(s, b"ok".as_ptr(), 2, ptr::null_mut()),
            WasmbedResult::Ok
        );
    }
}
