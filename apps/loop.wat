;; For tests only: never returns from on_message. The gateway's call deadline must stop it.
(module
  (memory (export "memory") 1)
  (func (export "alloc") (param i32) (result i32) (i32.const 1024))
  (func (export "on_message") (param i32 i32) (result i64)
    (loop $forever (br $forever))
    (i64.const 0)))
