;; For tests only: state exports that misbehave. Each DATA's first byte picks how the next
;; `snapshot` fails: 1 a pointer out of bounds, 2 a 100 MiB length, 3 a trap, 4 a loop past
;; the deadline; 0 a good 4-byte state. `restore` loops past the deadline when the state's
;; first byte is 4, and traps otherwise. Replies echo the byte.
(module
  (memory (export "memory") 1)
  (global $mode (mut i32) (i32.const 0))
  (func (export "alloc") (param $len i32) (result i32) (i32.const 1024))
  (func (export "on_message") (param $ptr i32) (param $len i32) (result i64)
    (global.set $mode (i32.load8_u (local.get $ptr)))
    (i64.or (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32)) (i64.const 1)))
  (func (export "snapshot") (result i64)
    (if (i32.eq (global.get $mode) (i32.const 1))
      (then (return (i64.or (i64.shl (i64.const 0xfff00000) (i64.const 32)) (i64.const 16)))))
    (if (i32.eq (global.get $mode) (i32.const 2))
      (then (return (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 104857600)))))
    (if (i32.eq (global.get $mode) (i32.const 3)) (then unreachable))
    (if (i32.eq (global.get $mode) (i32.const 4)) (then (loop $forever (br $forever))))
    (i64.or (i64.shl (i64.const 16) (i64.const 32)) (i64.const 4)))
  (func (export "restore") (param $ptr i32) (param $len i32)
    (if (i32.eq (i32.load8_u (local.get $ptr)) (i32.const 4))
      (then (loop $forever (br $forever))))
    unreachable))
