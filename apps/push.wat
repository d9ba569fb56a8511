;; push: answers each DATA with no REPLY body of its own, but pushes "pong:" + the bytes to the
;; device through the `send` import (a PUSH frame), then replies with nothing (empty REPLY).
(module
  (import "wasmbed" "send" (func $send (param i32 i32)))
  (memory (export "memory") 1)
  (data (i32.const 1019) "pong:")
  (func (export "alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 60000)) (then (return (i32.const 0))))
    (i32.const 1024))
  (func (export "on_message") (param $ptr i32) (param $len i32) (result i64)
    (call $send (i32.const 1019) (i32.add (local.get $len) (i32.const 5)))
    (i64.const 0)))
