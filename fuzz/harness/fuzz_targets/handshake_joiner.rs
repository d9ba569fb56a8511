#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmbed_fuzz::handshake_joiner(data));
