#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmbed_fuzz::tls_records(data));
