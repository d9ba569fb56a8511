;; For tests: echo, after a busy loop of about 5-10 ms per message (20,000,000
;; iterations), so that messages queue up behind each other (drain and GOAWAY tests).
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 64512)) (then (return (i32.const 0))))
    (i32.const 1024))
  (func (export "on_message") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32)
    (loop $spin
      (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $spin (i32.lt_u (local.get $i) (i32.const 20000000))))
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
