;; For tests and benchmarks: a state of any size up to 60,000 bytes, kept as it was given.
;; `restore` copies the bytes in; `snapshot` hands them back; each DATA replaces the state
;; with its own bytes and replies with nothing.
(module
  (memory (export "memory") 2)
  (global $len (mut i32) (i32.const 0))
  (func (export "alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 60000)) (then (return (i32.const 0))))
    (i32.const 4096))
  (func (export "on_message") (param $ptr i32) (param $len i32) (result i64)
    (memory.copy (i32.const 65536) (local.get $ptr) (local.get $len))
    (global.set $len (local.get $len))
    (i64.const 0))
  (func (export "snapshot") (result i64)
    (i64.or (i64.shl (i64.const 65536) (i64.const 32)) (i64.extend_i32_u (global.get $len))))
  (func (export "restore") (param $ptr i32) (param $len i32)
    (memory.copy (i32.const 65536) (local.get $ptr) (local.get $len))
    (global.set $len (local.get $len))))
