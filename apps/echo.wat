;; echo: replies to every DATA with the same bytes.
;; ABI (gateway/ABI.md): memory, alloc(len) -> ptr, on_message(ptr, len) -> (ptr << 32) | len.
(module
  (memory (export "memory") 1)
  ;; One message at a time: the host copies it to 1024 and the reply is the same bytes.
  (func (export "alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 64512)) (then (return (i32.const 0))))
    (i32.const 1024))
  (func (export "on_message") (param $ptr i32) (param $len i32) (result i64)
    (i64.or
      (i64.shl (i64.extend_i32_u (local.get $ptr)) (i64.const 32))
      (i64.extend_i32_u (local.get $len)))))
