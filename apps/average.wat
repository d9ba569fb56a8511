;; average: a moving average over the last 8 readings, state that moves with the session.
;; Each DATA's first byte is a reading (0..255); the REPLY is 2 bytes: the average of the
;; readings kept (rounded down) and how many are kept (1..8).
;; State (gateway/ABI.md): 11 bytes at 2047: format version 1, the 8 readings, the next slot,
;; the number kept. `restore` checks the version and length and traps on anything else.
(module
  (memory (export "memory") 1)
  (data (i32.const 2047) "\01")
  (func (export "alloc") (param $len i32) (result i32)
    (if (i32.gt_u (local.get $len) (i32.const 60000)) (then (return (i32.const 0))))
    (i32.const 4096))
  (func (export "on_message") (param $ptr i32) (param $len i32) (result i64)
    (local $i i32) (local $n i32) (local $sum i32) (local $slot i32)
    (if (i32.eqz (local.get $len)) (then unreachable))
    ;; store the reading in the next slot
    (local.set $slot (i32.load8_u (i32.const 2056)))
    (i32.store8 (i32.add (i32.const 2048) (local.get $slot)) (i32.load8_u (local.get $ptr)))
    (i32.store8 (i32.const 2056) (i32.and (i32.add (local.get $slot) (i32.const 1)) (i32.const 7)))
    (local.set $n (i32.load8_u (i32.const 2057)))
    (if (i32.lt_u (local.get $n) (i32.const 8))
      (then (local.set $n (i32.add (local.get $n) (i32.const 1)))))
    (i32.store8 (i32.const 2057) (local.get $n))
    ;; the average of the readings kept: slots 0..n-1 once the ring is full, else the first n
    (block $done
      (loop $next
        (br_if $done (i32.ge_u (local.get $i) (local.get $n)))
        (local.set $sum (i32.add (local.get $sum) (i32.load8_u (i32.add (i32.const 2048) (local.get $i)))))
        (local.set $i (i32.add (local.get $i) (i32.const 1)))
        (br $next)))
    (i32.store8 (i32.const 3000) (i32.div_u (local.get $sum) (local.get $n)))
    (i32.store8 (i32.const 3001) (local.get $n))
    (i64.or (i64.shl (i64.const 3000) (i64.const 32)) (i64.const 2)))
  (func (export "snapshot") (result i64)
    (i64.or (i64.shl (i64.const 2047) (i64.const 32)) (i64.const 11)))
  (func (export "restore") (param $ptr i32) (param $len i32)
    (if (i32.ne (local.get $len) (i32.const 11)) (then unreachable))
    (if (i32.ne (i32.load8_u (local.get $ptr)) (i32.const 1)) (then unreachable))
    (memory.copy (i32.const 2047) (local.get $ptr) (i32.const 11))))
