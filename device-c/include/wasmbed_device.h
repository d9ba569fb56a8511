/*
 * wasmbed-device: the device side of a Wasmbed session, as a C library.
 * Generated from device-c/src/lib.rs by cbindgen: do not edit; see docs/devices.md.
 */

#ifndef WASMBED_DEVICE_H
#define WASMBED_DEVICE_H

#include <stddef.h>
#include <stdint.h>
#include <stdbool.h>

// Results of calls that can fail.
typedef enum wasmbed_result {
  WASMBED_RESULT_OK,
  // A pointer that must not be null was null.
  WASMBED_RESULT_NULL,
  // `wasmbed_session_init`: the memory is smaller than `wasmbed_session_memory`.
  WASMBED_RESULT_MEMORY,
  // `wasmbed_session_init`: the memory is not aligned to 8 bytes.
  WASMBED_RESULT_ALIGNMENT,
  // `wasmbed_session_init`: an empty or non-UTF-8 name, or a size too small.
  WASMBED_RESULT_CONFIG,
  // `wasmbed_session_send_data`: the window is full; try again after an answer.
  WASMBED_RESULT_WINDOW_FULL,
  // `wasmbed_session_send_data`: the body can never fit the window.
  WASMBED_RESULT_TOO_LARGE,
  // `wasmbed_session_send_data`: the session is over.
  WASMBED_RESULT_DONE,
  // Bytes passed in lie in the session's own memory (an event's bytes, say): copy them
  // out first.
  WASMBED_RESULT_OVERLAP,
} wasmbed_result;

// What the transport should do now (`wasmbed_session_status`).
typedef enum wasmbed_status {
  // Open a connection (TCP, then TLS), then `wasmbed_session_connected`, or
  // `wasmbed_session_closed` if it failed.
  WASMBED_STATUS_CONNECT,
  // Nothing to do until `wasmbed_session_poll_timeout`.
  WASMBED_STATUS_WAIT,
  // Connected: write what `wasmbed_session_poll_send` gives, feed what arrives.
  WASMBED_STATUS_CONNECTED,
  // Close the connection, then `wasmbed_session_closed`.
  WASMBED_STATUS_CLOSE,
  // Over for good (the gateway refused the device: see the DISCONNECTED event's action).
  WASMBED_STATUS_DONE,
} wasmbed_status;

// The kind of an event (`wasmbed_event.kind`).
typedef enum wasmbed_event_kind {
  // A session opened: `data`/`len` the gateway's name, `resume` how, `seq` the DATA it
  // resumed after, `text`/`text_len` why a ticket was refused.
  WASMBED_EVENT_KIND_WELCOME,
  // The answer to DATA `seq`: `data`/`len`.
  WASMBED_EVENT_KIND_REPLY,
  // DATA `seq` was answered ERROR `code` (the app failed on it).
  WASMBED_EVENT_KIND_FAILED,
  // DATA `seq` is in the resumed state; its answer was lost with the connection.
  WASMBED_EVENT_KIND_COVERED,
  // DATA `seq` will never be answered.
  WASMBED_EVENT_KIND_LOST,
  // Bytes the app sent unprompted: `data`/`len`, its `seq`.
  WASMBED_EVENT_KIND_PUSH,
  // A new ticket covering DATA up to `seq`: store `wasmbed_session_ticket` to survive a
  // reboot.
  WASMBED_EVENT_KIND_CHECKPOINT,
  // The gateway is leaving; the session will resume elsewhere by itself.
  WASMBED_EVENT_KIND_GOAWAY,
  // The connection ended: `cause`, and for REFUSED the ERROR `code` and `action`.
  WASMBED_EVENT_KIND_DISCONNECTED,
} wasmbed_event_kind;

// How a session started (`wasmbed_event.resume`, WELCOME).
typedef enum wasmbed_resume {
  // No ticket was presented.
  WASMBED_RESUME_NEW,
  // The ticket was taken: the app's state is back.
  WASMBED_RESUME_RESTORED,
  // The ticket was taken; the app keeps no state.
  WASMBED_RESUME_STATELESS,
  // The ticket was refused (`text` says why): the app's state restarted.
  WASMBED_RESUME_REFUSED,
} wasmbed_resume;

// Why a connection ended (`wasmbed_event.cause`, DISCONNECTED).
typedef enum wasmbed_cause {
  WASMBED_CAUSE_CLOSED,
  WASMBED_CAUSE_GOAWAY,
  // No WELCOME, no answers after GOAWAY, or no PONG in time.
  WASMBED_CAUSE_SILENT,
  // ERROR `code` about the session; `action` says what the device does.
  WASMBED_CAUSE_REFUSED,
  // The peer broke the protocol (`code`: the ERROR code naming it, 0 for other breaks).
  WASMBED_CAUSE_VIOLATION,
} wasmbed_cause;

// What a session-level ERROR means (`wasmbed_event.action`).
typedef enum wasmbed_action {
  // Reconnect after a backoff and resume.
  WASMBED_ACTION_RETRY,
  // Reconnect after a backoff without the ticket.
  WASMBED_ACTION_FRESH,
  // Stop: an operator must act (unknown app, identity mismatch, revoked).
  WASMBED_ACTION_GIVE_UP,
} wasmbed_action;

// A session (opaque): lives at the start of the caller's memory.
typedef struct wasmbed_session wasmbed_session;

// A session's settings. `wasmbed_config_init` fills in the defaults.
typedef struct wasmbed_config {
  // The device's id (its certificate's common name), NUL-terminated UTF-8; copied.
  const char *device;
  // The application to open, NUL-terminated UTF-8; copied.
  const char *app;
  // Bytes kept for resend: each DATA takes 13 bytes plus its body until a ticket covers
  // it.
  size_t window;
  // The largest frame accepted (its length field).
  size_t max_frame;
  // The largest ticket kept.
  size_t max_ticket;
  // A PING after this long without a frame from the peer; 0: none.
  uint64_t keepalive_ms;
  // How long WELCOME (and the answers after GOAWAY) may take.
  uint64_t answer_timeout_ms;
  // Backoff between failed attempts, doubled each time up to the maximum.
  uint64_t first_backoff_ms;
  uint64_t max_backoff_ms;
  // Seeds the backoff's jitter: give each device its own (a hardware random number).
  uint64_t seed;
} wasmbed_config;

// One event. Pointers are into the session's memory, valid until the next call on it.
typedef struct wasmbed_event {
  enum wasmbed_event_kind kind;
  uint64_t seq;
  uint16_t code;
  const uint8_t *data;
  size_t len;
  const uint8_t *text;
  size_t text_len;
  enum wasmbed_resume resume;
  enum wasmbed_cause cause;
  enum wasmbed_action action;
} wasmbed_event;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// Fills `config` with the defaults (a 4 KiB window, frames up to 2 KiB, tickets up to 1 KiB,
// keep-alive 30 s, answers within 5 s, backoff 100 ms to 30 s) for `device` and `app`
// (NUL-terminated; the pointers are kept in `config`, the strings copied only at init).
//
// # Safety
// `config` is null or points to writable memory for a `wasmbed_config`.
void wasmbed_config_init(struct wasmbed_config *config, const char *device, const char *app);

// The bytes of memory (aligned to 8) a session with `config` needs; 0 for a config that
// cannot make one.
//
// # Safety
// As for `wasmbed_config_init`'s config, read only.
size_t wasmbed_session_memory(const struct wasmbed_config *config);

// Makes a session in `memory` (`len` bytes, aligned to 8); the handle, or null with the
// reason in `*result` (when `result` is not null).
//
// # Safety
// `memory` is null or valid for `len` bytes, aligned to 8, and stays valid and untouched by
// the caller while the handle is used; `config` as for `wasmbed_session_memory`; `result`
// is null or writable.
struct wasmbed_session *wasmbed_session_init(uint8_t *memory,
                                             size_t len,
                                             const struct wasmbed_config *config,
                                             enum wasmbed_result *result);

// What the transport should do now. A null handle reads as DONE.
//
// # Safety
// `s` as everywhere: null or a live handle.
enum wasmbed_status wasmbed_session_status(struct wasmbed_session *s);

// The connection is open (TLS done); HELLO goes first.
//
// # Safety
// `s`: null or a live handle.
void wasmbed_session_connected(struct wasmbed_session *s, uint64_t now_ms);

// The connection ended (closed by either side, failed, or never opened).
//
// # Safety
// `s`: null or a live handle.
void wasmbed_session_closed(struct wasmbed_session *s, uint64_t now_ms);

// Bytes received; how many were taken. Take the events (`wasmbed_session_poll_event` until
// false) and feed the rest again.
//
// # Safety
// `s`: null or a live handle; `bytes` null or valid for `len` bytes.
size_t wasmbed_session_feed(struct wasmbed_session *s,
                            const uint8_t *bytes,
                            size_t len,
                            uint64_t now_ms);

// Bytes to write now: their count, and `*bytes` pointing at them (in the session's memory,
// valid until the next call on it). Then `wasmbed_session_sent` with how many went.
//
// # Safety
// `s`: null or a live handle; `bytes` null or writable.
size_t wasmbed_session_poll_send(struct wasmbed_session *s, const uint8_t **bytes);

// `n` of the bytes `wasmbed_session_poll_send` gave were written.
//
// # Safety
// `s`: null or a live handle.
void wasmbed_session_sent(struct wasmbed_session *s, size_t n);

// When `wasmbed_session_handle_timeout` is due: true and `*at_ms`, or false (not until
// something happens).
//
// # Safety
// `s`: null or a live handle; `at_ms` null or writable.
bool wasmbed_session_poll_timeout(struct wasmbed_session *s, uint64_t *at_ms);

// The time is `now_ms`: back-off over, answers overdue, keep-alive.
//
// # Safety
// `s`: null or a live handle.
void wasmbed_session_handle_timeout(struct wasmbed_session *s, uint64_t now_ms);

// Queues DATA (`len` bytes, copied); its sequence in `*seq` (when not null). It goes when a
// session is open and is resent until a ticket covers it.
//
// # Safety
// `s`: null or a live handle; `body` null (with `len` 0) or valid for `len` bytes; `seq`
// null or writable.
enum wasmbed_result wasmbed_session_send_data(struct wasmbed_session *s,
                                              const uint8_t *body,
                                              size_t len,
                                              uint64_t *seq);

// The next event into `*event`: true, or false when there is none. Call it until false
// after every feed, close and timeout.
//
// # Safety
// `s`: null or a live handle; `event` null or writable.
bool wasmbed_session_poll_event(struct wasmbed_session *s, struct wasmbed_event *event);

// The latest ticket: true with `*seq` (the last DATA it covers), `*ticket` and `*len` (in
// the session's memory, valid until the next call); false when there is none.
//
// # Safety
// `s`: null or a live handle; the out pointers null or writable.
bool wasmbed_session_ticket(struct wasmbed_session *s,
                            uint64_t *seq,
                            const uint8_t **ticket,
                            size_t *len);

// A ticket kept across a reboot (copied), before any DATA and any connection: the first
// connection resumes from it. False when DATA was already queued, a connection was made, or
// the ticket is too large.
//
// # Safety
// `s`: null or a live handle; `ticket` null or valid for `len` bytes.
bool wasmbed_session_restore(struct wasmbed_session *s,
                             uint64_t seq,
                             const uint8_t *ticket,
                             size_t len);

// DATA given that has no answer event yet.
//
// # Safety
// `s`: null or a live handle.
uint64_t wasmbed_session_owed(struct wasmbed_session *s);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* WASMBED_DEVICE_H */
