#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmbed_fuzz::proxy_config(data));
