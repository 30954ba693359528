;; hello.wat: a bridge handler written directly in WebAssembly text, to show that the
;; handler ABI (docs/handler-abi.md) needs nothing but WASI preview 1.
;;
;; It reads its whole stdin (the task input, one JSON document) and counts the bytes,
;; without parsing them, then writes
;;     {"greeting":"Hello from WAT!","input_bytes":N}
;; to stdout and returns from _start, which means exit code 0.
;; If stdin cannot be read it writes the ABI's error document and exits with code 1.
;;
;; The module imports only from wasi_snapshot_preview1 and exports `memory` and `_start`,
;; as the ABI requires. All WASI calls return an errno: 0 means success.
(module
  ;; fd_read(fd, iovs, iovs_len, nread_out) -> errno
  (import "wasi_snapshot_preview1" "fd_read"
    (func $fd_read (param i32 i32 i32 i32) (result i32)))
  ;; fd_write(fd, iovs, iovs_len, nwritten_out) -> errno
  (import "wasi_snapshot_preview1" "fd_write"
    (func $fd_write (param i32 i32 i32 i32) (result i32)))
  ;; proc_exit(code): ends the run with that exit code; never returns.
  (import "wasi_snapshot_preview1" "proc_exit"
    (func $proc_exit (param i32)))

  ;; One 64 KiB page, laid out as:
  ;;      0..8      an iovec {ptr: i32, len: i32} for fd_read / fd_write
  ;;      8..12     where fd_read / fd_write store the byte count
  ;;     64..96     scratch for the decimal digits of N, written backwards from 96
  ;;    256..322    the reply: a 44-byte prefix (data segment), then N's digits, then "}\n"
  ;;    512..573    the error reply (61 bytes)
  ;;   1024..5120   the read buffer (its contents are never looked at)
  (memory (export "memory") 1)

  (data (i32.const 256) "{\"greeting\":\"Hello from WAT!\",\"input_bytes\":")
  (data (i32.const 512) "{\"error\":{\"kind\":\"failed\",\"message\":\"could not read stdin\"}}\n")

  ;; Writes len bytes at ptr to fd, calling fd_write until all are written (a host may
  ;; accept fewer bytes than asked). Returns 0, or the errno of the failed write.
  (func $write_all (param $fd i32) (param $ptr i32) (param $len i32) (result i32)
    (local $errno i32)
    (local $written i32)
    (block $done
      (loop $more
        (br_if $done (i32.eqz (local.get $len)))
        (i32.store (i32.const 0) (local.get $ptr))
        (i32.store (i32.const 4) (local.get $len))
        (local.set $errno
          (call $fd_write (local.get $fd) (i32.const 0) (i32.const 1) (i32.const 8)))
        (if (local.get $errno) (then (return (local.get $errno))))
        (local.set $written (i32.load (i32.const 8)))
        ;; No progress and no error: give up with errno 29 (EIO) rather than spin.
        (if (i32.eqz (local.get $written)) (then (return (i32.const 29))))
        (local.set $ptr (i32.add (local.get $ptr) (local.get $written)))
        (local.set $len (i32.sub (local.get $len) (local.get $written)))
        (br $more)))
    (i32.const 0))

  (func $start (export "_start")
    (local $total i64)   ;; stdin bytes seen so far
    (local $errno i32)
    (local $n i32)       ;; bytes returned by one fd_read
    (local $p i32)       ;; first digit in the scratch area
    (local $end i32)     ;; end of the reply being built

    ;; 1. Read stdin (fd 0) to end of file, 4 KiB at a time, counting the bytes.
    (block $eof
      (loop $read
        (i32.store (i32.const 0) (i32.const 1024))
        (i32.store (i32.const 4) (i32.const 4096))
        (local.set $errno
          (call $fd_read (i32.const 0) (i32.const 0) (i32.const 1) (i32.const 8)))
        (if (local.get $errno)
          (then
            ;; The error document of the ABI, then exit code 1 ("the handler failed").
            (drop (call $write_all (i32.const 1) (i32.const 512) (i32.const 61)))
            (call $proc_exit (i32.const 1))
            (unreachable)))
        (local.set $n (i32.load (i32.const 8)))
        (br_if $eof (i32.eqz (local.get $n)))   ;; 0 bytes read: end of file
        (local.set $total (i64.add (local.get $total) (i64.extend_i32_u (local.get $n))))
        (br $read)))

    ;; 2. Write the total in decimal, last digit first, ending just before offset 96.
    (local.set $p (i32.const 96))
    (loop $digit
      (local.set $p (i32.sub (local.get $p) (i32.const 1)))
      (i32.store8 (local.get $p)
        (i32.add (i32.const 48)   ;; '0'
          (i32.wrap_i64 (i64.rem_u (local.get $total) (i64.const 10)))))
      (local.set $total (i64.div_u (local.get $total) (i64.const 10)))
      (br_if $digit (i64.ne (local.get $total) (i64.const 0))))

    ;; 3. Append the digits to the prefix (256 + 44 = 300), then "}\n".
    (local.set $end (i32.const 300))
    (block $copied
      (loop $copy
        (br_if $copied (i32.eq (local.get $p) (i32.const 96)))
        (i32.store8 (local.get $end) (i32.load8_u (local.get $p)))
        (local.set $p (i32.add (local.get $p) (i32.const 1)))
        (local.set $end (i32.add (local.get $end) (i32.const 1)))
        (br $copy)))
    (i32.store8 (local.get $end) (i32.const 125))                     ;; '}'
    (i32.store8 (i32.add (local.get $end) (i32.const 1)) (i32.const 10)) ;; '\n'
    (local.set $end (i32.add (local.get $end) (i32.const 2)))

    ;; 4. Write the reply to stdout (fd 1). Returning from _start is exit code 0.
    (if (call $write_all (i32.const 1) (i32.const 256)
                         (i32.sub (local.get $end) (i32.const 256)))
      (then (call $proc_exit (i32.const 1))))))
