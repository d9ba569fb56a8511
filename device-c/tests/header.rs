//! The committed header is what cbindgen makes from the code: a C program never sees a
//! declaration the library does not have.

#[test]
fn the_header_is_generated_from_the_code() {
    let dir = env!("CARGO_MANIFEST_DIR");
    let config =
        cbindgen::Config::from_file(format!("{dir}/cbindgen.toml")).expect("cbindgen.toml");
    let mut made = Vec::new();
    cbindgen::Builder::new()
        .with_crate(dir)
        .with_config(config)
        .generate()
        .expect("cbindgen reads the crate")
        .write(&mut made);
    let path = format!("{dir}/include/wasmbed_device.h");
    if std::env::var_os("WASMBED_WRITE_HEADER").is_some() {
        std::fs::write(&path, &made).expect("write the header");
    }
    let committed = std::fs::read(&path).unwrap_or_default();
    assert!(
        committed == made,
        "{path} is not what cbindgen makes from the code: run \
         `WASMBED_WRITE_HEADER=1 cargo test -p wasmbed-device-c --test header` and commit it"
    );
}
