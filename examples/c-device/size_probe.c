/* Calls every function of the C API once: linked with --gc-sections, what stays of the
 * library is what a firmware image using it would carry (size.sh). */
#include "wasmbed_device.h"

static uint64_t mem[8192 / 8];

int main(void) {
  wasmbed_config c;
  wasmbed_event e;
  const uint8_t *p;
  uint64_t seq;
  size_t len;
  wasmbed_config_init(&c, "d", "a");
  wasmbed_session *s = wasmbed_session_init((uint8_t *)mem, sizeof mem, &c, 0);
  wasmbed_session_restore(s, 1, (const uint8_t *)"t", 1);
  wasmbed_session_connected(s, 0);
  wasmbed_session_send_data(s, (const uint8_t *)"x", 1, &seq);
  len = wasmbed_session_poll_send(s, &p);
  wasmbed_session_sent(s, len);
  wasmbed_session_feed(s, (const uint8_t *)"", 0, 0);
  while (wasmbed_session_poll_event(s, &e)) {
  }
  wasmbed_session_poll_timeout(s, &seq);
  wasmbed_session_handle_timeout(s, 0);
  wasmbed_session_ticket(s, &seq, &p, &len);
  wasmbed_session_closed(s, 0);
  return (int)wasmbed_session_status(s) + (int)wasmbed_session_owed(s) +
         (int)wasmbed_session_memory(&c);
}
