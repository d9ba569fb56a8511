#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmbed_fuzz::anchor_peers(data));
