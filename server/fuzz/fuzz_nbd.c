/* cbw — server/fuzz/fuzz_nbd.c: libFuzzer target for cbwd's protocol code:
 * the input is a client byte stream (handshake options, then requests), fed
 * to a session in fragments whose sizes also come from the input; every
 * request that comes out is executed against in-memory exports (one
 * writable with a dirty bitmap, one read-only) and its reply built, as the
 * server would.  Single-threaded; exports are created once.
 *
 * Input: byte 0 = fragment size (low 6 bits) and the session's TLS mode
 * (top 2 bits: off, on, require, require), then the client's bytes.  When
 * the session acknowledges NBD_OPT_STARTTLS, the next byte decides what
 * follows: 0x16 (a TLS handshake record) hands the rest of the input to a
 * real GnuTLS server session (tls.c, PSK credentials), as conn.c does —
 * random bytes there must fail the handshake cleanly; any other byte
 * stands for a successful handshake and the rest is fed as plaintext
 * options (STARTTLS before/after other options, a second STARTTLS, ...).
 *
 * Build: -DCBW_FUZZ=ON -DCMAKE_C_COMPILER=clang.  Seeds: corpus/ (made by
 * make_corpus.py).
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "export.h"
#include "nbd_session.h"
#include "tls.h"

static struct cbwd_tls_creds *creds;

static void
init_tls (void)
{
  char path[] = "/tmp/fuzz_nbd_psk.XXXXXX";
  int fd = mkstemp (path);
  if (fd < 0) abort ();
  static const char line[] = "alice:0123456789abcdef0123456789abcdef\n";
  if (write (fd, line, sizeof line - 1) != (ssize_t) (sizeof line - 1)) abort ();
  close (fd);
  struct cbwd_tls_config cfg = { .mode = CBWD_TLS_REQUIRE, .psk = path };
  struct cbw_err err;
  creds = cbwd_tls_creds_load (&cfg, &err);
  unlink (path);
  if (!creds) abort ();
}

/* The rest of the input as the client's side of a TLS handshake, fed in
 * fragments like a socket would deliver it.  Returns bytes used. */
static size_t
run_tls (const uint8_t *data, size_t size, unsigned chunk)
{
  struct cbw_err err;
  struct cbwd_tls *t = cbwd_tls_new (creds, &err);
  if (!t) abort ();
  size_t used = 0;
  int rc = 0;
  while (used < size && rc == 0) {
    size_t n = size - used < chunk ? size - used : chunk;
    if (cbwd_tls_input (t, data + used, n) == -1) break;
    used += n;
    rc = cbwd_tls_handshake (t, &err);
    size_t olen;
    free (cbwd_tls_take_output (t, &olen));
  }
  if (rc == 1) {                  /* (not reachable without the key) */
    uint8_t buf[4096];
    while (cbwd_tls_recv (t, buf, sizeof buf, &err) > 0) ;
  }
  cbwd_tls_free (t);
  return used;
}

static struct cbwd_exports exps;

static void
init_exports (void)
{
  static struct cbwd_export *v[2];
  struct cbw_err err;
  v[0] = cbwd_export_memory_new ("disk", 1 << 20, false, &err);
  v[1] = cbwd_export_memory_new ("ro", 100000, true, &err);
  if (!v[0] || !v[1]) abort ();
  static const uint64_t r[][2] = { { 0, 4096 }, { 65536, 131072 }, { 1000000, 48576 } };
  struct cbwd_meta m;
  if (cbwd_meta_bitmap_from_ranges (&m, "bm", r, 3, v[0]->size, &err) == -1 ||
      cbwd_export_add_meta (v[0], &m, &err) == -1)
    abort ();
  exps.n = 2;
  exps.v = v;
}

static unsigned nreq;

static void
on_request (void *opaque, struct cbwd_request *r)
{
  (void) opaque;
  if (++nreq <= 64) {
    cbwd_request_execute (r);
    struct cbwd_reply rep;
    if (cbwd_reply_build (r, &rep) == 0) {
      /* Touch every byte of the reply like a socket write would. */
      volatile uint8_t sink = 0;
      for (size_t i = 0; i < rep.nseg; i++) {
        const uint8_t *p = rep.seg[i].in_hdr ? rep.hdr.data + rep.seg[i].off
                                             : r->data + rep.seg[i].off;
        if (rep.seg[i].len) sink ^= p[0] ^ p[rep.seg[i].len - 1];
      }
      (void) sink;
    }
    cbwd_reply_free (&rep);
  }
  cbwd_request_free (r);
}

static const struct cbwd_session_ops ops = { .request = on_request };

int
LLVMFuzzerTestOneInput (const uint8_t *data, size_t size)
{
  if (!exps.n) { init_exports (); init_tls (); }
  if (size < 1) return 0;
  unsigned chunk = data[0] % 64 + 1;
  static const enum cbwd_tls_mode modes[4] = { CBWD_TLS_OFF, CBWD_TLS_ON,
                                               CBWD_TLS_REQUIRE, CBWD_TLS_REQUIRE };
  enum cbwd_tls_mode mode = modes[data[0] >> 6];
  data++; size--;
  struct cbwd_session s;
  cbwd_session_init (&s, &exps, &ops, NULL);
  s.tls_mode = mode;
  nreq = 0;
  while (size > 0 && !cbwd_session_closed (&s)) {
    if (s.state == SS_STARTTLS) {
      s.out.len = 0;
      if (data[0] == 0x16) {      /* TLS bytes: a real handshake, then done */
        run_tls (data, size, chunk);
        break;
      }
      cbwd_session_tls_done (&s); /* stands for a successful handshake */
      data++; size--;
      continue;
    }
    size_t n = size < chunk ? size : chunk;
    size_t dn;
    uint8_t *direct = cbwd_session_direct_buf (&s, &dn);
    if (direct) {
      if (n > dn) n = dn;
      memcpy (direct, data, n);
      cbwd_session_direct_done (&s, n);
    }
    else
      n = cbwd_session_feed (&s, data, n);
    s.out.len = 0;                /* "sent" */
    data += n; size -= n;
    chunk = chunk * 7 % 61 + 1;   /* vary fragmentation */
  }
  cbwd_session_free (&s);
  return 0;
}
