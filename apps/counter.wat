;; counter: keeps state across messages. Each DATA adds its bytes (as unsigned values) to a
;; running sum; the REPLY is 16 bytes: the message count and the sum, both u64 little-endian.
;; A migration that loses or replays a message changes both numbers.
;; State that moves (gateway/ABI.md): `snapshot` hands the host 17 bytes, a format version
;; (1) then count and sum; `restore` takes them back (and traps on any other format).
(module
  (import "wasmbed" "log" (func $log (param i32 i32)))
  (memory (export "memory") 1)
  (global $count (mut i64) (i64.const 0))
  (global $sum (mut i64) (i64.const 0))
  (data (i32.const 0) "counter open")
  (func (export "on_open")
    (call $log (i32.const 0) (i32.const 12)))
  (func (export "alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 60000)) (then (return (i32.const 0))))
    (i32.const 1024))
  (func (export "on_message") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32)
    (global.set $count (i64.add (global.get $count) (i64.const 1)))
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $len)))
        (global.set $sum
          (i64.add (global.get $sum)
            (i64.extend_i32_u (i32.load8_u (i32.add (local.get $ptr) (local.get $i))))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i64.store (i32.const 512) (global.get $count))
    (i64.store (i32.const 520) (global.get $sum))
    (i64.or (i64.shl (i64.const 512) (i64.const 32)) (i64.const 16)))
  (func (export "snapshot") (result i64)
    (i32.store8 (i32.const 511) (i32.const 1))
    (i64.store (i32.const 512) (global.get $count))
    (i64.store (i32.const 520) (global.get $sum))
    (i64.or (i64.shl (i64.const 511) (i64.const 32)) (i64.const 17)))
  (func (export "restore") (param $ptr i32) (param $len i32)
    (if (i32.ne (local.get $len) (i32.const 17)) (then unreachable))
    (if (i32.ne (i32.load8_u (local.get $ptr)) (i32.const 1)) (then unreachable))
    (global.set $count (i64.load (i32.add (local.get $ptr) (i32.const 1))))
    (global.set $sum (i64.load (i32.add (local.get $ptr) (i32.const 9))))))
