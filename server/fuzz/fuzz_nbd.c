/* cbw — server/fuzz/fuzz_nbd.c: libFuzzer target for cbwd's protocol code:
 * the input is a client byte stream (handshake options, then requests), fed
 * to a session in fragments whose sizes also come from the input; every
 * request that comes out is executed against in-memory exports (one
 * writable with a dirty bitmap, one read-only) and its reply built, as the
 * server would.  Single-threaded; exports are created once.
 *
 * Build: -DCBW_FUZZ=ON -DCMAKE_C_COMPILER=clang.  Seeds: corpus/ (made by
 * make_corpus.py).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "export.h"
#include "nbd_session.h"

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
  if (!exps.n) init_exports ();
  if (size < 1) return 0;
  unsigned chunk = data[0] % 64 + 1;
  data++; size--;
  struct cbwd_session s;
  cbwd_session_init (&s, &exps, &ops, NULL);
  nreq = 0;
  while (size > 0 && !cbwd_session_closed (&s)) {
    size_t n = size < chunk ? size : chunk;
    size_t dn;
    uint8_t *direct = cbwd_session_direct_buf (&s, &dn);
    if (direct) {
      if (n > dn) n = dn;
      memcpy (direct, data, n);
      cbwd_session_direct_done (&s, n);
    }
    else
      cbwd_session_feed (&s, data, n);
    s.out.len = 0;                /* "sent" */
    data += n; size -= n;
    chunk = chunk * 7 % 61 + 1;   /* vary fragmentation */
  }
  cbwd_session_free (&s);
  return 0;
}
