/*
 * A Wasmbed device in C: mbedTLS for TLS, the wasmbed-device library for the session.
 *
 *   c-device HOST PORT CA CERT KEY DEVICE APP COUNT INTERVAL_MS [tls1.2|tls1.3]
 *
 * Connects to HOST:PORT (the proxy) with the device certificate CERT/KEY, opens a session
 * with APP, sends COUNT DATA one every INTERVAL_MS, and prints one line per event. With the
 * `counter` app it checks that the app's state never restarts (each REPLY's count is at least
 * the number of replies so far). Drops are the library's business: it reconnects, resumes
 * with its ticket and resends what the ticket does not cover. Ends with a `done ...` line;
 * exit 0 when nothing was lost and the state never restarted.
 *
 * All the session's memory is the static buffer below: no allocation by the library.
 */
#define _POSIX_C_SOURCE 200809L

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <mbedtls/ctr_drbg.h>
#include <mbedtls/entropy.h>
#include <mbedtls/error.h>
#include <mbedtls/net_sockets.h>
#include <mbedtls/ssl.h>
#include <mbedtls/version.h>
#include <mbedtls/x509_crt.h>

#include "wasmbed_device.h"

static uint64_t now_ms(void) {
  struct timespec t;
  clock_gettime(CLOCK_MONOTONIC, &t);
  return (uint64_t)t.tv_sec * 1000 + (uint64_t)t.tv_nsec / 1000000;
}

static void sleep_ms(uint64_t ms) {
  struct timespec t = {(time_t)(ms / 1000), (long)(ms % 1000) * 1000000L};
  nanosleep(&t, NULL);
}

/* The session's memory: 8-byte aligned, sized for the config below (checked at start). */
static uint64_t memory[16 * 1024 / 8];

struct tls {
  mbedtls_net_context net;
  mbedtls_ssl_context ssl;
  mbedtls_ssl_config conf;
  mbedtls_x509_crt ca, cert;
  mbedtls_pk_context key;
  mbedtls_entropy_context entropy;
  mbedtls_ctr_drbg_context drbg;
  const char *host, *port;
  int open;
};

static void fail(const char *what, int rc) {
  char msg[160];
  mbedtls_strerror(rc, msg, sizeof msg);
  fprintf(stderr, "c-device: %s: %s (-0x%04x)\n", what, msg, (unsigned)-rc);
  exit(2);
}

static void tls_setup(struct tls *t, const char *ca, const char *cert, const char *key,
                      int tls13) {
  int rc;
  mbedtls_net_init(&t->net);
  mbedtls_ssl_init(&t->ssl);
  mbedtls_ssl_config_init(&t->conf);
  mbedtls_x509_crt_init(&t->ca);
  mbedtls_x509_crt_init(&t->cert);
  mbedtls_pk_init(&t->key);
  mbedtls_entropy_init(&t->entropy);
  mbedtls_ctr_drbg_init(&t->drbg);
  if ((rc = mbedtls_ctr_drbg_seed(&t->drbg, mbedtls_entropy_func, &t->entropy,
                                  (const unsigned char *)"c-device", 8)) != 0)
    fail("seeding the random generator", rc);
  if ((rc = mbedtls_x509_crt_parse_file(&t->ca, ca)) != 0) fail(ca, rc);
  if ((rc = mbedtls_x509_crt_parse_file(&t->cert, cert)) != 0) fail(cert, rc);
#if MBEDTLS_VERSION_MAJOR >= 3
  rc = mbedtls_pk_parse_keyfile(&t->key, key, NULL, mbedtls_ctr_drbg_random, &t->drbg);
#else
  rc = mbedtls_pk_parse_keyfile(&t->key, key, NULL);
#endif
  if (rc != 0) fail(key, rc);
  if ((rc = mbedtls_ssl_config_defaults(&t->conf, MBEDTLS_SSL_IS_CLIENT,
                                        MBEDTLS_SSL_TRANSPORT_STREAM,
                                        MBEDTLS_SSL_PRESET_DEFAULT)) != 0)
    fail("TLS defaults", rc);
  mbedtls_ssl_conf_authmode(&t->conf, MBEDTLS_SSL_VERIFY_REQUIRED);
  mbedtls_ssl_conf_ca_chain(&t->conf, &t->ca, NULL);
  if ((rc = mbedtls_ssl_conf_own_cert(&t->conf, &t->cert, &t->key)) != 0)
    fail("the device certificate", rc);
  mbedtls_ssl_conf_rng(&t->conf, mbedtls_ctr_drbg_random, &t->drbg);
  if (tls13) {
#if defined(MBEDTLS_SSL_PROTO_TLS1_3)
    mbedtls_ssl_conf_min_tls_version(&t->conf, MBEDTLS_SSL_VERSION_TLS1_3);
    mbedtls_ssl_conf_max_tls_version(&t->conf, MBEDTLS_SSL_VERSION_TLS1_3);
#else
    fprintf(stderr, "c-device: this mbedTLS (%s) is built without TLS 1.3\n",
            MBEDTLS_VERSION_STRING);
    exit(2);
#endif
  } else {
#if MBEDTLS_VERSION_MAJOR >= 3
    mbedtls_ssl_conf_min_tls_version(&t->conf, MBEDTLS_SSL_VERSION_TLS1_2);
    mbedtls_ssl_conf_max_tls_version(&t->conf, MBEDTLS_SSL_VERSION_TLS1_2);
#else
    mbedtls_ssl_conf_min_version(&t->conf, MBEDTLS_SSL_MAJOR_VERSION_3,
                                 MBEDTLS_SSL_MINOR_VERSION_3);
    mbedtls_ssl_conf_max_version(&t->conf, MBEDTLS_SSL_MAJOR_VERSION_3,
                                 MBEDTLS_SSL_MINOR_VERSION_3);
#endif
  }
  if ((rc = mbedtls_ssl_setup(&t->ssl, &t->conf)) != 0) fail("TLS setup", rc);
  if ((rc = mbedtls_ssl_set_hostname(&t->ssl, "localhost")) != 0) fail("TLS name", rc);
}

/* TCP, then the TLS handshake; 0 when the connection is up. */
static int tls_connect(struct tls *t) {
  int rc;
  mbedtls_ssl_session_reset(&t->ssl);
  if ((rc = mbedtls_net_connect(&t->net, t->host, t->port, MBEDTLS_NET_PROTO_TCP)) != 0)
    return rc;
  mbedtls_ssl_set_bio(&t->ssl, &t->net, mbedtls_net_send, NULL, mbedtls_net_recv_timeout);
  mbedtls_ssl_conf_read_timeout(&t->conf, 5000);
  while ((rc = mbedtls_ssl_handshake(&t->ssl)) != 0) {
    if (rc != MBEDTLS_ERR_SSL_WANT_READ && rc != MBEDTLS_ERR_SSL_WANT_WRITE) {
      mbedtls_net_free(&t->net);
      return rc;
    }
  }
  t->open = 1;
  return 0;
}

static void tls_close(struct tls *t) {
  if (t->open) {
    mbedtls_ssl_close_notify(&t->ssl);
    mbedtls_net_free(&t->net);
    t->open = 0;
  }
}

struct tally {
  unsigned long replies, covered, lost, failed, resets, reconnects, resumed, tickets;
  uint64_t answered;
};

static void print_events(wasmbed_session *s, struct tally *n) {
  wasmbed_event e;
  while (wasmbed_session_poll_event(s, &e)) {
    switch (e.kind) {
    case WASMBED_EVENT_KIND_WELCOME: {
      static const char *how[] = {"new", "restored", "stateless", "refused"};
      printf("welcome gateway=%.*s resume=%s seq=%llu\n", (int)e.len, (const char *)e.data,
             how[e.resume], (unsigned long long)e.seq);
      if (e.resume == WASMBED_RESUME_RESTORED) n->resumed++;
      break;
    }
    case WASMBED_EVENT_KIND_REPLY: {
      uint64_t count = 0;
      if (e.len >= 8)
        for (int i = 7; i >= 0; i--) count = (count << 8) | e.data[i];
      n->replies++;
      /* The counter app's count covers every DATA answered so far (a resend may add). */
      if (e.len >= 8 && count < n->replies) n->resets++;
      printf("reply seq=%llu count=%llu\n", (unsigned long long)e.seq,
             (unsigned long long)count);
      n->answered = e.seq;
      break;
    }
    case WASMBED_EVENT_KIND_FAILED:
      n->failed++;
      n->answered = e.seq;
      printf("failed seq=%llu code=%u\n", (unsigned long long)e.seq, e.code);
      break;
    case WASMBED_EVENT_KIND_COVERED:
      n->covered++;
      n->answered = e.seq;
      break;
    case WASMBED_EVENT_KIND_LOST:
      n->lost++;
      n->answered = e.seq;
      printf("lost seq=%llu\n", (unsigned long long)e.seq);
      break;
    case WASMBED_EVENT_KIND_CHECKPOINT:
      n->tickets++;
      break;
    case WASMBED_EVENT_KIND_DISCONNECTED:
      n->reconnects++;
      printf("disconnected cause=%d code=%u\n", (int)e.cause, e.code);
      break;
    default:
      break;
    }
  }
}

int main(int argc, char **argv) {
  if (argc < 10) {
    fprintf(stderr, "usage: c-device HOST PORT CA CERT KEY DEVICE APP COUNT INTERVAL_MS "
                    "[tls1.2|tls1.3]\n");
    return 2;
  }
  setvbuf(stdout, NULL, _IOLBF, 0);
  struct tls t = {0};
  t.host = argv[1];
  t.port = argv[2];
  int tls13 = argc > 10 && strcmp(argv[10], "tls1.3") == 0;
  tls_setup(&t, argv[3], argv[4], argv[5], tls13);
  unsigned long count = strtoul(argv[8], NULL, 10);
  uint64_t interval = strtoull(argv[9], NULL, 10);

  wasmbed_config config;
  wasmbed_config_init(&config, argv[6], argv[7]);
  config.max_frame = 1024;
  config.max_ticket = 512;
  config.first_backoff_ms = 20;
  config.max_backoff_ms = 1000;
  mbedtls_ctr_drbg_random(&t.drbg, (unsigned char *)&config.seed, sizeof config.seed);
  size_t need = wasmbed_session_memory(&config);
  if (need == 0 || need > sizeof memory) {
    fprintf(stderr, "c-device: the session needs %zu bytes, %zu given\n", need, sizeof memory);
    return 2;
  }
  wasmbed_result r;
  wasmbed_session *s = wasmbed_session_init((uint8_t *)memory, sizeof memory, &config, &r);
  if (s == NULL) {
    fprintf(stderr, "c-device: no session (result %d)\n", (int)r);
    return 2;
  }
  printf("memory session=%zu\n", need);

  struct tally n = {0};
  unsigned long sent = 0;
  /* A write mbedTLS could not finish: it must be called again with the same bytes. */
  size_t retry = 0;
  uint64_t next_send = now_ms();
  unsigned char buf[1024];
  for (;;) {
    print_events(s, &n);
    if (sent == count && wasmbed_session_owed(s) == 0) break;
    uint64_t now = now_ms(), at;
    switch (wasmbed_session_status(s)) {
    case WASMBED_STATUS_DONE:
      fprintf(stderr, "c-device: the gateway refused this device for good\n");
      return 1;
    case WASMBED_STATUS_CONNECT:
      if (tls_connect(&t) == 0)
        wasmbed_session_connected(s, now_ms());
      else
        wasmbed_session_closed(s, now_ms());
      continue;
    case WASMBED_STATUS_CLOSE:
      retry = 0;
      tls_close(&t);
      wasmbed_session_closed(s, now_ms());
      continue;
    case WASMBED_STATUS_WAIT:
      if (wasmbed_session_poll_timeout(s, &at) && at > now) sleep_ms(at - now);
      wasmbed_session_handle_timeout(s, now_ms());
      continue;
    case WASMBED_STATUS_CONNECTED:
      break;
    }
    /* Connected: DATA when due, then write, then read until the next thing is due. */
    if (sent < count && now >= next_send) {
      uint8_t body[8];
      for (int i = 0; i < 8; i++) body[i] = (uint8_t)((uint64_t)sent >> (8 * i));
      if (wasmbed_session_send_data(s, body, sizeof body, NULL) == WASMBED_RESULT_OK) {
        sent++;
        next_send += interval;
      }
    }
    const uint8_t *out;
    size_t len = wasmbed_session_poll_send(s, &out);
    if (retry > 0 && retry <= len) len = retry;
    if (len > 0) {
      int w = mbedtls_ssl_write(&t.ssl, out, len);
      retry = 0;
      if (w > 0) {
        wasmbed_session_sent(s, (size_t)w);
      } else if (w == MBEDTLS_ERR_SSL_WANT_WRITE || w == MBEDTLS_ERR_SSL_WANT_READ) {
        retry = len;
      } else {
        tls_close(&t);
        wasmbed_session_closed(s, now_ms());
      }
      continue;
    }
    uint64_t until = sent < count ? next_send : now + 1000;
    if (wasmbed_session_poll_timeout(s, &at) && at < until) until = at;
    uint32_t wait = until > now ? (uint32_t)(until - now) : 1;
    mbedtls_ssl_conf_read_timeout(&t.conf, wait);
    int got = mbedtls_ssl_read(&t.ssl, buf, sizeof buf);
    if (got > 0) {
      size_t off = 0;
      while (off < (size_t)got) {
        off += wasmbed_session_feed(s, buf + off, (size_t)got - off, now_ms());
        print_events(s, &n);
      }
    } else if (got == MBEDTLS_ERR_SSL_TIMEOUT || got == MBEDTLS_ERR_SSL_WANT_READ) {
      wasmbed_session_handle_timeout(s, now_ms());
#if defined(MBEDTLS_ERR_SSL_RECEIVED_NEW_SESSION_TICKET)
    } else if (got == MBEDTLS_ERR_SSL_RECEIVED_NEW_SESSION_TICKET) {
      /* TLS 1.3 (mbedTLS 3.x): a session ticket, not an error. */
#endif
    } else {
      tls_close(&t);
      wasmbed_session_closed(s, now_ms());
    }
  }
  tls_close(&t);
  printf("done sent=%lu replies=%lu covered=%lu lost=%lu failed=%lu resets=%lu "
         "reconnects=%lu resumed=%lu tickets=%lu tls=%s\n",
         sent, n.replies, n.covered, n.lost, n.failed, n.resets, n.reconnects, n.resumed,
         n.tickets, mbedtls_ssl_get_version(&t.ssl));
  return n.lost == 0 && n.resets == 0 ? 0 : 1;
}
