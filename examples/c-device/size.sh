#!/usr/bin/env bash
# The device library's code size: `.text` (and `.rodata`, `.data`, `.bss`) of its own objects
# — wasmbed-device-c, wasmbed-device, wasmbed-protocol, minicbor — in the static library
# built size-optimised (profile `release-size`: opt-level "z", one codegen unit, panic =
# abort). The archive also carries Rust's std, core and alloc whole (a host static library
# links std); a firmware image links only the few `core` functions the library calls
# (memcpy, slice and UTF-8 helpers, the panic path), which it shares with everything else.
set -euo pipefail
out="${1:-$(dirname "$0")/../../target/c-device}"
cargo build --locked --profile release-size -p wasmbed-device-c --target-dir "$out" >&2
lib="$out/release-size/libwasmbed_device_c.a"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
ar x "$lib"
own=$(ls | grep -E '^(wasmbed_device_c|wasmbed_device|wasmbed_protocol|minicbor)-' || true)
echo "host: $(lscpu | sed -n 's/^Model name: *//p'), $(rustc --version)"
echo "library: $lib"
echo "own objects (section sizes, bytes):"
# shellcheck disable=SC2086
size -t $own | sed 's/^/  /'

# What a program using it keeps: every API function called once (size_probe.c), linked with
# --gc-sections: the library's own functions that stay.
here=$(cd "$(dirname "$0")" && pwd)
cc -Os -ffunction-sections -fdata-sections -I"$here/../../device-c/include" \
  -o probe "$here/size_probe.c" "$lib" -Wl,--gc-sections -lpthread -ldl -lm
nm -S -C -t d --size-sort probe | awk '
  $3 ~ /^[tTrRdD]$/ {
    n = $2 + 0; name = $0; sub(/^[^ ]+ [^ ]+ [^ ]+ /, "", name)
    if (name ~ /^<?&?(mut )?(wasmbed_device|wasmbed_protocol|minicbor)/ || name ~ /^wasmbed_(session|config)_/) {
      if ($3 ~ /[tT]/) text += n; else data += n
    }
  }
  END {
    printf "linked into a program that calls every API function (--gc-sections):\n"
    printf "  the library'"'"'s own functions: %d bytes of code, %d of data\n", text, data
  }'
echo "(the rest of that program is libc and Rust std's panic and backtrace machinery, which a"
echo " no_std firmware build with panic = abort does not have)"
