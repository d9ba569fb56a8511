#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmbed_fuzz::quic_intake(data));
