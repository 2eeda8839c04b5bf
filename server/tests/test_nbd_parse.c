/* cbw — server/tests/test_nbd_parse.c: Criterion tests of cbwd's protocol
 * parsers without sockets: the session framing (any fragmentation), option
 * handling, request validation, reply layout, extent lists, the dirty-bitmap
 * context, the config parsers, and authorization (a refused export answered
 * byte for byte like a missing one, LIST filtered per identity).  Expected bytes are written out from the
 * NBD spec here, not derived from cbwd's own encoders.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "export.h"
#include "nbd_proto.h"
#include "nbd_session.h"

static struct cbwd_request *got[64];
static size_t ngot;
static void cap_request (void *o, struct cbwd_request *r) { (void) o; cr_assert (ngot < 64); got[ngot++] = r; }
static const struct cbwd_session_ops cap_ops = { .request = cap_request };

static struct cbwd_exports exps;
static struct cbwd_export *mem, *ro;

static void
setup (void)
{
  struct cbw_err err = { 0 };
  mem = cbwd_export_memory_new ("mem", 1 << 20, false, &err);
  ro = cbwd_export_memory_new ("ro", 65536, true, &err);
  cr_assert (mem && ro);
  static const uint64_t r[][2] = { { 4096, 8192 }, { 0, 512 }, { 8192, 100 }, { 100000, 1 } };
  struct cbwd_meta m;
  cr_assert (cbwd_meta_bitmap_from_ranges (&m, "bm", r, 4, mem->size, &err) == 0, "%s", err.msg);
  cr_assert (cbwd_export_add_meta (mem, &m, &err) == 0);
  static struct cbwd_export *v[2];
  v[0] = mem; v[1] = ro;
  exps.n = 2; exps.v = v;
  ngot = 0;
}

static void
teardown (void)
{
  for (size_t i = 0; i < ngot; i++) cbwd_request_free (got[i]);
  cbwd_export_free (mem);
  cbwd_export_free (ro);
}

/* Byte builders. */
static size_t
put_opt (uint8_t *b, uint32_t opt, const void *data, uint32_t len)
{
  put_be64 (b, NBD_IHAVEOPT); put_be32 (b + 8, opt); put_be32 (b + 12, len);
  if (len) memcpy (b + 16, data, len);
  return 16 + len;
}

static size_t
go_data (uint8_t *b, const char *name)
{
  uint32_t n = strlen (name);
  put_be32 (b, n); memcpy (b + 4, name, n); put_be16 (b + 4 + n, 0);
  return 6 + n;
}

/* Walk option replies in s->out starting at *pos: returns the reply type. */
static uint32_t
next_reply (struct cbwd_session *s, size_t *pos, uint32_t *len)
{
  cr_assert (*pos + 20 <= s->out.len, "no reply at %zu (have %zu)", *pos, s->out.len);
  const uint8_t *p = s->out.data + *pos;
  cr_assert_eq (get_be64 (p), 0x3e889045565a9ULL);
  uint32_t t = get_be32 (p + 12);
  *len = get_be32 (p + 16);
  *pos += 20 + *len;
  return t;
}

static void
start (struct cbwd_session *s)
{
  cbwd_session_init (s, &exps, &cap_ops, NULL);
  cr_assert_eq (s->out.len, 18);
  cr_assert_eq (get_be64 (s->out.data), 0x4e42444d41474943ULL);
  cr_assert_eq (get_be64 (s->out.data + 8), 0x49484156454F5054ULL);
  cr_assert_eq (get_be16 (s->out.data + 16), 3);
  uint8_t f[4]; put_be32 (f, 3);
  cbwd_session_feed (s, f, 4);
  s->out.len = 0;
}

static void
go (struct cbwd_session *s, const char *name, bool structured)
{
  uint8_t b[256], d[128];
  size_t n = 0, pos = 0;
  uint32_t len;
  if (structured) n += put_opt (b, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
  n += put_opt (b + n, NBD_OPT_GO, d, go_data (d, name));
  cbwd_session_feed (s, b, n);
  if (structured) cr_assert_eq (next_reply (s, &pos, &len), NBD_REP_ACK);
  uint32_t t;
  while ((t = next_reply (s, &pos, &len)) == NBD_REP_INFO) ;
  cr_assert_eq (t, NBD_REP_ACK);
  cr_assert_eq (s->state, SS_REQ_HEADER);
  s->out.len = 0;
}

static void
put_req (uint8_t *b, uint16_t flags, uint16_t type, uint64_t cookie, uint64_t off, uint32_t len)
{
  put_be32 (b, 0x25609513); put_be16 (b + 4, flags); put_be16 (b + 6, type);
  put_be64 (b + 8, cookie); put_be64 (b + 16, off); put_be32 (b + 24, len);
}

TestSuite (session, .init = setup, .fini = teardown);

Test (session, unknown_client_flags_close)
{
  struct cbwd_session s;
  cbwd_session_init (&s, &exps, &cap_ops, NULL);
  uint8_t f[4]; put_be32 (f, 0x80);
  cbwd_session_feed (&s, f, 4);
  cr_assert (cbwd_session_closed (&s));
  cbwd_session_free (&s);
}

Test (session, fragmentation_is_invisible)
{
  /* The same option stream fed at once and byte by byte gives the same output. */
  uint8_t b[1024], d[256];
  size_t n = 0;
  n += put_opt (b + n, NBD_OPT_LIST, NULL, 0);
  n += put_opt (b + n, 999, "xyz", 3);
  n += put_opt (b + n, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
  n += put_opt (b + n, NBD_OPT_INFO, d, go_data (d, "mem"));
  n += put_opt (b + n, NBD_OPT_GO, d, go_data (d, "ro"));
  struct cbwd_session a, c;
  start (&a); start (&c);
  cbwd_session_feed (&a, b, n);
  for (size_t i = 0; i < n; i++) cbwd_session_feed (&c, b + i, 1);
  cr_assert_eq (a.out.len, c.out.len);
  cr_assert (memcmp (a.out.data, c.out.data, a.out.len) == 0);
  cr_assert_eq (a.state, SS_REQ_HEADER);
  cr_assert_eq (a.exp, ro);
  size_t pos = 0; uint32_t len;
  cr_assert_eq (next_reply (&a, &pos, &len), NBD_REP_SERVER);
  cr_assert_eq (next_reply (&a, &pos, &len), NBD_REP_SERVER);
  cr_assert_eq (next_reply (&a, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (next_reply (&a, &pos, &len), NBD_REP_ERR_UNSUP);
  cr_assert_eq (next_reply (&a, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (next_reply (&a, &pos, &len), NBD_REP_INFO);   /* EXPORT */
  cr_assert_eq (len, 12);
  cbwd_session_free (&a); cbwd_session_free (&c);
}

Test (session, info_export_fields)
{
  struct cbwd_session s;
  start (&s);
  uint8_t b[256], d[128];
  size_t dl = go_data (d, "ro");
  /* ask for NAME and BLOCK_SIZE */
  d[dl - 2] = 0; d[dl - 1] = 2;
  memcpy (d + dl, "\0\1\0\3", 4);
  cbwd_session_feed (&s, b, put_opt (b, NBD_OPT_INFO, d, dl + 4));
  size_t pos = 0; uint32_t len;
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_INFO);
  const uint8_t *p = s.out.data + pos - len;
  cr_assert_eq (get_be16 (p), NBD_INFO_EXPORT);
  cr_assert_eq (get_be64 (p + 2), 65536);
  cr_assert (get_be16 (p + 10) & NBD_FLAG_READ_ONLY);
  cr_assert (get_be16 (p + 10) & NBD_FLAG_HAS_FLAGS);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_INFO);
  p = s.out.data + pos - len;
  cr_assert_eq (get_be16 (p), NBD_INFO_NAME);
  cr_assert (len == 4 && memcmp (p + 2, "ro", 2) == 0);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_INFO);
  p = s.out.data + pos - len;
  cr_assert_eq (get_be16 (p), NBD_INFO_BLOCK_SIZE);
  cr_assert_eq (get_be32 (p + 2), 1);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (s.state, SS_OPT_HEADER);     /* INFO does not end the handshake */
  cbwd_session_free (&s);
}

Test (session, set_meta_context_ids_and_reset_on_other_export)
{
  struct cbwd_session s;
  start (&s);
  uint8_t b[512], d[256];
  size_t n = put_opt (b, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
  size_t dl = 0;
  put_be32 (d, 3); memcpy (d + 4, "mem", 3); put_be32 (d + 7, 2); dl = 11;
  const char *q1 = "qemu:dirty-bitmap:bm", *q2 = "base:allocation";
  put_be32 (d + dl, strlen (q1)); memcpy (d + dl + 4, q1, strlen (q1)); dl += 4 + strlen (q1);
  put_be32 (d + dl, strlen (q2)); memcpy (d + dl + 4, q2, strlen (q2)); dl += 4 + strlen (q2);
  n += put_opt (b + n, NBD_OPT_SET_META_CONTEXT, d, dl);
  cbwd_session_feed (&s, b, n);
  size_t pos = 0; uint32_t len;
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_META_CONTEXT);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_META_CONTEXT);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (s.nsel, 2);
  /* GO to another export drops the selection: block status is then EINVAL. */
  s.out.len = 0;
  n = put_opt (b, NBD_OPT_GO, d, go_data (d, "ro"));
  cbwd_session_feed (&s, b, n);
  cr_assert_eq (s.nsel, 0);
  uint8_t r[28];
  put_req (r, 0, NBD_CMD_BLOCK_STATUS, 1, 0, 4096);
  cbwd_session_feed (&s, r, 28);
  cr_assert_eq (ngot, 1);
  cr_assert_eq (got[0]->preset_errno, EINVAL);
  cbwd_session_free (&s);
}

Test (session, oversize_option_discarded)
{
  struct cbwd_session s;
  start (&s);
  size_t big = CBWD_MAX_OPTION_LEN + 10;
  uint8_t *b = calloc (1, big + 64);
  put_be64 (b, NBD_IHAVEOPT); put_be32 (b + 8, NBD_OPT_LIST_META_CONTEXT); put_be32 (b + 12, big);
  size_t n = 16 + big;
  n += put_opt (b + n, NBD_OPT_LIST, NULL, 0);
  cbwd_session_feed (&s, b, n);
  size_t pos = 0; uint32_t len;
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ERR_TOO_BIG);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_SERVER);
  cr_assert (s.optbuf == NULL);
  free (b);
  cbwd_session_free (&s);
}

struct vcase { uint16_t flags, type; uint64_t off; uint32_t len; int want; bool ro; };

Test (session, request_validation)
{
  static const struct vcase cases[] = {
    { 0, NBD_CMD_READ, 0, 4096, 0, false },
    { 0, NBD_CMD_READ, (1 << 20) - 1, 2, EINVAL, false },
    { 0, NBD_CMD_READ, UINT64_MAX - 10, 100, EINVAL, false },
    { 0, NBD_CMD_READ, 0, CBWD_MAX_PAYLOAD + 1, EINVAL, false },
    { 0, 42, 0, 1, EINVAL, false },
    { 0x20, NBD_CMD_READ, 0, 1, EINVAL, false },
    { NBD_CMD_FLAG_REQ_ONE, NBD_CMD_READ, 0, 1, EINVAL, false },
    { NBD_CMD_FLAG_NO_HOLE, NBD_CMD_WRITE_ZEROES, 0, 1, 0, false },
    { NBD_CMD_FLAG_FAST_ZERO, NBD_CMD_TRIM, 0, 1, EINVAL, false },
    { NBD_CMD_FLAG_DF, NBD_CMD_READ, 0, 1, 0, false },
    { NBD_CMD_FLAG_DF, NBD_CMD_BLOCK_STATUS, 0, 1, EINVAL, false },
    { 0, NBD_CMD_WRITE_ZEROES, (1 << 20) - 1, 2, ENOSPC, false },
    { 0, NBD_CMD_TRIM, (1 << 20) - 1, 2, EINVAL, false },
    { 0, NBD_CMD_BLOCK_STATUS, 0, 0, EINVAL, false },
    { 0, NBD_CMD_BLOCK_STATUS, 0, UINT32_MAX, EINVAL, false },
    { 0, NBD_CMD_FLUSH, 12345, 999, 0, false },
    { 0, NBD_CMD_TRIM, 0, 1, EPERM, true },
    { 0, NBD_CMD_WRITE_ZEROES, 0, 1, EPERM, true },
    { NBD_CMD_FLAG_FUA, NBD_CMD_READ, 0, 1, 0, true },
  };
  for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
    struct cbwd_session s;
    start (&s);
    go (&s, cases[i].ro ? "ro" : "mem", true);
    uint8_t r[28];
    put_req (r, cases[i].flags, cases[i].type, 77 + i, cases[i].off, cases[i].len);
    struct cbwd_request *req;
    uint32_t payload; bool discard;
    cr_assert_eq (cbwd_tx_parse (&s, r, &req, &payload, &discard), 0);
    cr_assert_eq (req->preset_errno, cases[i].want, "case %zu: got %d want %d", i,
                  req->preset_errno, cases[i].want);
    cr_assert_eq (req->cookie, 77 + i);
    cbwd_request_free (req);
    cbwd_session_free (&s);
  }
}

Test (session, write_payload_kept_or_discarded)
{
  struct cbwd_session s;
  start (&s);
  go (&s, "ro", false);
  uint8_t b[28 + 100 + 28];
  put_req (b, 0, NBD_CMD_WRITE, 5, 0, 100);
  memset (b + 28, 0xee, 100);
  put_req (b + 128, 0, NBD_CMD_READ, 6, 0, 10);
  cbwd_session_feed (&s, b, sizeof b);
  cr_assert_eq (ngot, 2);
  cr_assert_eq (got[0]->preset_errno, EPERM);
  cr_assert_eq (got[0]->payload, NULL);
  cr_assert_eq (got[1]->cookie, 6);
  cr_assert_eq (got[1]->preset_errno, 0);
  /* Bad magic closes; DISC closes. */
  uint8_t r[28];
  put_req (r, 0, NBD_CMD_READ, 1, 0, 1);
  r[0] ^= 1;
  cbwd_session_feed (&s, r, 28);
  cr_assert (cbwd_session_closed (&s));
  cbwd_session_free (&s);
}

Test (session, execute_and_structured_replies)
{
  struct cbwd_session s;
  start (&s);
  go (&s, "mem", true);
  uint8_t b[28 + 8192];
  put_req (b, 0, NBD_CMD_WRITE, 1, 8192, 8192);
  memset (b + 28, 0x5a, 8192);
  cbwd_session_feed (&s, b, sizeof b);
  cr_assert_eq (ngot, 1);
  cbwd_request_execute (got[0]);
  cr_assert_eq (got[0]->err.errnum, 0);
  put_req (b, 0, NBD_CMD_READ, 2, 4096, 12288);
  cbwd_session_feed (&s, b, 28);
  cbwd_request_execute (got[1]);
  struct cbwd_reply rep;
  cr_assert_eq (cbwd_reply_build (got[1], &rep), 0);
  /* memory export reports no holes: one OFFSET_DATA chunk with DONE */
  cr_assert_eq (rep.nseg, 2);
  const uint8_t *h = rep.hdr.data;
  cr_assert_eq (get_be32 (h), 0x668e33ef);
  cr_assert_eq (get_be16 (h + 4), 1);
  cr_assert_eq (get_be16 (h + 6), 1);
  cr_assert_eq (get_be64 (h + 8), 2);
  cr_assert_eq (get_be32 (h + 16), 8 + 12288);
  cr_assert_eq (get_be64 (h + 20), 4096);
  cr_assert_eq (got[1]->data[4095], 0);
  cr_assert_eq (got[1]->data[4096], 0x5a);
  cbwd_reply_free (&rep);
  /* Holes given by a backend become OFFSET_HOLE chunks in order. */
  cbwd_holes_add (&got[1]->holes, 0, 4096);
  cr_assert_eq (cbwd_reply_build (got[1], &rep), 0);
  cr_assert_eq (rep.nseg, 3);
  h = rep.hdr.data;
  cr_assert_eq (get_be16 (h + 4), 0);              /* not DONE */
  cr_assert_eq (get_be16 (h + 6), NBD_REPLY_TYPE_OFFSET_HOLE);
  cr_assert_eq (get_be64 (h + 20), 4096);
  cr_assert_eq (get_be32 (h + 28), 4096);
  cr_assert_eq (get_be16 (h + 32 + 4), 1);         /* DONE */
  cr_assert_eq (get_be16 (h + 32 + 6), NBD_REPLY_TYPE_OFFSET_DATA);
  cr_assert_eq (get_be64 (h + 32 + 20), 8192);
  cbwd_reply_free (&rep);
  /* Errors carry errno and message. */
  got[1]->err.errnum = ENOSPC;
  strcpy (got[1]->err.msg, "full");
  cr_assert_eq (cbwd_reply_build (got[1], &rep), 0);
  h = rep.hdr.data;
  cr_assert_eq (get_be16 (h + 6), NBD_REPLY_TYPE_ERROR);
  cr_assert_eq (get_be32 (h + 16), 6 + 4);
  cr_assert_eq (get_be32 (h + 20), 28);
  cr_assert_eq (get_be16 (h + 24), 4);
  cr_assert (memcmp (h + 26, "full", 4) == 0);
  cbwd_reply_free (&rep);
  cbwd_session_free (&s);
}

Test (session, simple_reply_layout)
{
  struct cbwd_session s;
  start (&s);
  go (&s, "ro", false);
  uint8_t b[28];
  put_req (b, 0, NBD_CMD_READ, 0x1122334455667788ULL, 100, 50);
  cbwd_session_feed (&s, b, 28);
  cbwd_request_execute (got[0]);
  struct cbwd_reply rep;
  cr_assert_eq (cbwd_reply_build (got[0], &rep), 0);
  cr_assert_eq (rep.nseg, 2);
  cr_assert_eq (rep.hdr.len, 16);
  cr_assert_eq (get_be32 (rep.hdr.data), 0x67446698);
  cr_assert_eq (get_be32 (rep.hdr.data + 4), 0);
  cr_assert_eq (get_be64 (rep.hdr.data + 8), 0x1122334455667788ULL);
  cr_assert_eq (rep.seg[1].len, 50);
  cbwd_reply_free (&rep);
  cbwd_session_free (&s);
}

TestSuite (extents);

Test (extents, merge_split_and_limits)
{
  struct cbwd_extents x;
  cbwd_extents_init (&x, 0, UINT64_MAX, 100);
  cr_assert_eq (cbwd_extents_add (&x, 100, 1), 0);
  cr_assert_eq (cbwd_extents_add (&x, 50, 1), 0);
  cr_assert_eq (x.n, 1);
  cr_assert_eq (x.e[0].length, 150);
  cr_assert_eq (cbwd_extents_add (&x, 5ULL << 32, 0), 0);   /* split into u32 runs */
  uint64_t sum = 0;
  for (size_t i = 1; i < x.n; i++) { sum += x.e[i].length; cr_assert (x.e[i].length % 4096 == 0 || i == x.n - 1); }
  cr_assert_eq (sum, 5ULL << 32);
  cbwd_extents_free (&x);
  cbwd_extents_init (&x, 0, 1000, 2);
  cr_assert_eq (cbwd_extents_add (&x, 10, 1), 0);
  cr_assert_eq (cbwd_extents_add (&x, 10, 0), 0);
  cr_assert_eq (cbwd_extents_add (&x, 10, 1), 1);           /* max descriptors */
  cr_assert_eq (x.n, 2);
  cbwd_extents_free (&x);
  cbwd_extents_init (&x, 0, 1000, 10);
  cr_assert_eq (cbwd_extents_add (&x, 5000, 1), 1);         /* clipped to limit */
  cr_assert_eq (x.e[0].length, 1000);
  cbwd_extents_free (&x);
}

Test (extents, dirty_bitmap_context, .init = setup, .fini = teardown)
{
  /* mem has ranges [0,512) [4096,12288) [8192,8292) [100000,100001) */
  struct cbwd_meta *m = &mem->metas[mem->nmetas - 1];
  cr_assert_str_eq (m->name, "qemu:dirty-bitmap:bm");
  struct cbw_err err = { 0 };
  struct cbwd_extents x;
  cbwd_extents_init (&x, 100, 200000, 100);
  cr_assert_eq (m->extents (mem, m, &x, &err), 0);
  uint32_t want[][2] = { { 412, 1 }, { 3584, 0 }, { 8192, 1 }, { 87712, 0 }, { 1, 1 }, { 99999 + 100 - 100000 + 100000 - 99900 - 1, 0 } };
  /* total requested 200000 from 100: last clean run is 200100 - 100001 = 100099 */
  want[5][0] = 100099;
  cr_assert_eq (x.n, 6);
  for (size_t i = 0; i < 6; i++) {
    cr_assert_eq (x.e[i].length, want[i][0], "extent %zu length %u", i, x.e[i].length);
    cr_assert_eq (x.e[i].flags, want[i][1]);
  }
  cbwd_extents_free (&x);
}

Test (extents, raw_bitmap_validation)
{
  char path[] = "/tmp/cbwd-test-raw.XXXXXX";
  int fd = mkstemp (path);
  cr_assert (fd >= 0);
  /* 10 granules of 64K (export 640K - 1): 2 bytes, bits 10..15 must be 0 */
  uint8_t bits[2] = { 0x81, 0x02 };
  cr_assert_eq (write (fd, bits, 2), 2);
  struct cbwd_meta m;
  struct cbw_err err = { 0 };
  cr_assert_eq (cbwd_meta_bitmap_from_raw (&m, "b", path, 65536, 640 * 1024 - 1, &err), 0, "%s", err.msg);
  m.free (&m);
  cr_assert_eq (cbwd_meta_bitmap_from_raw (&m, "b", path, 65536, 2 << 20, &err), -1);  /* wrong size */
  cr_assert_eq (cbwd_meta_bitmap_from_raw (&m, "b", path, 65537, 640 * 1024, &err), -1); /* bad gran */
  bits[1] = 0x06;   /* bit 10 set: past the end */
  cr_assert_eq (pwrite (fd, bits, 2, 0), 2);
  cr_assert_eq (cbwd_meta_bitmap_from_raw (&m, "b", path, 65536, 640 * 1024 - 1, &err), -1);
  cr_assert (strstr (err.msg, "past the end"));
  close (fd);
  unlink (path);
}

TestSuite (config);

Test (config, sizes_and_specs)
{
  uint64_t v;
  cr_assert (cbwd_parse_size ("4096", &v) == 0 && v == 4096);
  cr_assert (cbwd_parse_size ("64K", &v) == 0 && v == 65536);
  cr_assert (cbwd_parse_size ("2GiB", &v) == 0 && v == 2ULL << 30);
  cr_assert (cbwd_parse_size ("-1", &v) == -1);
  cr_assert (cbwd_parse_size ("1X", &v) == -1);
  cr_assert (cbwd_parse_size ("99999999999999999999", &v) == -1);
  cr_assert (cbwd_parse_size ("20000000T", &v) == -1);
  struct cbwd_export_spec s;
  struct cbw_err err = { 0 };
  cr_assert_eq (cbwd_parse_export_kv ("name=a,type=store,path=/x,size=1M,limit=64K,bitmap=b:raw:/y:128K", &s, &err), 0, "%s", err.msg);
  cr_assert_str_eq (s.name, "a");
  cr_assert_eq (s.limit, 65536);
  cr_assert_eq (s.nbitmaps, 1);
  cr_assert_eq (s.bitmaps[0].granularity, 131072);
  cbwd_export_spec_free (&s);
  cr_assert_eq (cbwd_parse_export_kv ("name=a,name=b", &s, &err), -1);
  cbwd_export_spec_free (&s);
  cr_assert_eq (cbwd_parse_export_kv ("name=a,bogus=1", &s, &err), -1);
  cr_assert (strstr (err.msg, "bogus"));
  cbwd_export_spec_free (&s);
  cr_assert_eq (cbwd_parse_export_kv ("name=a,bitmap=b:weird:/p", &s, &err), -1);
  cbwd_export_spec_free (&s);
  cr_assert_eq (cbwd_parse_export_kv ("noequals", &s, &err), -1);
  cbwd_export_spec_free (&s);
  cr_assert_eq (cbwd_parse_export_kv ("name=a,type=store,path=/x,direct=on", &s, &err), 0);
  cr_assert_eq (s.direct, 1);
  cbwd_export_spec_free (&s);
  cr_assert_eq (cbwd_parse_export_kv ("name=a,type=store,path=/x", &s, &err), 0);
  cr_assert_eq (s.direct, 0);
  cbwd_export_spec_free (&s);
  cr_assert_eq (cbwd_parse_export_kv ("name=a,type=store,path=/x,direct=maybe", &s, &err), -1);
  cr_assert (strstr (err.msg, "direct"), "%s", err.msg);
  cbwd_export_spec_free (&s);
}

/* ---- STARTTLS (NBD spec "TLS support") ---- */

static void
start_tls_mode (struct cbwd_session *s, enum cbwd_tls_mode mode, uint32_t flags)
{
  cbwd_session_init (s, &exps, &cap_ops, NULL);
  s->tls_mode = mode;
  uint8_t f[4]; put_be32 (f, flags);
  cbwd_session_feed (s, f, 4);
  s->out.len = 0;
}

Test (session, starttls_unsupported_when_off)
{
  struct cbwd_session s;
  start_tls_mode (&s, CBWD_TLS_OFF, 3);
  uint8_t b[64];
  size_t pos = 0;
  uint32_t len;
  cbwd_session_feed (&s, b, put_opt (b, NBD_OPT_STARTTLS, NULL, 0));
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ERR_UNSUP);
  cr_assert_eq (s.state, SS_OPT_HEADER);
  cbwd_session_free (&s);
}

Test (session, require_refuses_options_before_tls)
{
  struct cbwd_session s;
  start_tls_mode (&s, CBWD_TLS_REQUIRE, 3);
  uint8_t b[512], d[128];
  size_t n = 0, pos = 0;
  uint32_t len;
  n += put_opt (b + n, NBD_OPT_LIST, NULL, 0);
  n += put_opt (b + n, NBD_OPT_GO, d, go_data (d, "mem"));
  n += put_opt (b + n, NBD_OPT_INFO, d, go_data (d, "mem"));
  n += put_opt (b + n, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
  n += put_opt (b + n, 999, NULL, 0);                  /* unknown option too */
  cr_assert_eq (cbwd_session_feed (&s, b, n), n);
  for (int i = 0; i < 5; i++)
    cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ERR_TLS_REQD, "option %d", i);
  cr_assert_eq (pos, s.out.len);
  cr_assert_eq (s.state, SS_OPT_HEADER);
  cr_assert (!s.structured);
  /* EXPORT_NAME cannot be answered with an error: the session ends. */
  cbwd_session_feed (&s, b, put_opt (b, NBD_OPT_EXPORT_NAME, "mem", 3));
  cr_assert (cbwd_session_closed (&s));
  cr_assert_null (s.exp);
  cbwd_session_free (&s);
}

Test (session, require_needs_fixed_newstyle)
{
  struct cbwd_session s;
  start_tls_mode (&s, CBWD_TLS_REQUIRE, 0);
  cr_assert (cbwd_session_closed (&s));
  cbwd_session_free (&s);
}

Test (session, starttls_stops_feed_and_restarts_options)
{
  struct cbwd_session s;
  start_tls_mode (&s, CBWD_TLS_REQUIRE, 3);
  uint8_t b[512];
  size_t n = 0, pos = 0;
  uint32_t len;
  n += put_opt (b + n, NBD_OPT_STARTTLS, NULL, 0);
  memset (b + n, 0x16, 24);                     /* TLS records, not options */
  size_t used = cbwd_session_feed (&s, b, n + 24);
  cr_assert_eq (used, n, "the bytes after STARTTLS belong to TLS");
  cr_assert_eq (s.state, SS_STARTTLS);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (len, 0);
  cr_assert_eq (cbwd_session_feed (&s, b + n, 24), 0, "nothing consumed during the handshake");
  s.out.len = 0;
  cbwd_session_tls_done (&s);
  cr_assert (s.tls_active);
  cr_assert_eq (s.state, SS_OPT_HEADER);
  /* Options work now; a second STARTTLS is invalid and changes nothing. */
  pos = 0;
  n = put_opt (b, NBD_OPT_STARTTLS, NULL, 0);
  n += put_opt (b + n, NBD_OPT_LIST, NULL, 0);
  cr_assert_eq (cbwd_session_feed (&s, b, n), n);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ERR_INVALID);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_SERVER);
  s.out.len = 0;
  go (&s, "mem", true);
  cbwd_session_free (&s);
}

Test (session, starttls_forgets_earlier_negotiation)
{
  struct cbwd_session s;
  start_tls_mode (&s, CBWD_TLS_ON, 3);
  uint8_t b[512], d[256];
  size_t n = 0, pos = 0;
  uint32_t len;
  /* ON: plain options are served; structured replies and a context
   * selection made before STARTTLS must not survive it. */
  n += put_opt (b + n, NBD_OPT_STRUCTURED_REPLY, NULL, 0);
  uint32_t dl = 0;
  put_be32 (d, 3); memcpy (d + 4, "mem", 3); put_be32 (d + 7, 1);
  put_be32 (d + 11, 15); memcpy (d + 15, "base:allocation", 15);
  dl = 30;
  n += put_opt (b + n, NBD_OPT_SET_META_CONTEXT, d, dl);
  n += put_opt (b + n, NBD_OPT_STARTTLS, "x", 1);       /* with data: invalid */
  n += put_opt (b + n, NBD_OPT_STARTTLS, NULL, 0);
  cr_assert_eq (cbwd_session_feed (&s, b, n), n);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_META_CONTEXT);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ERR_INVALID);
  cr_assert_eq (next_reply (&s, &pos, &len), NBD_REP_ACK);
  cr_assert_eq (s.state, SS_STARTTLS);
  cr_assert (s.structured && s.nsel == 1);
  cbwd_session_tls_done (&s);
  cr_assert (!s.structured, "structured replies survived STARTTLS");
  cr_assert_eq (s.nsel, 0, "meta contexts survived STARTTLS");
  cr_assert_null (s.meta_export);
  cbwd_session_free (&s);
}

/* Authorization: "ro" may be opened over TCP by psk:alice only, "mem" is
 * denied over TCP by default (as a store).  A refused export must be
 * answered byte for byte like a missing one, and LIST must not show it. */
static void
authz_start (struct cbwd_session *s, bool tcp, const char *identity)
{
  struct cbw_err err = { 0 };
  if (!ro->has_allow)
    cr_assert (cbwd_export_allow (ro, "psk:alice", &err) == 0, "%s", err.msg);
  mem->tcp_deny_default = true;
  start (s);
  s->tcp = tcp;
  s->identity = identity;
}

/* The names LIST shows, joined with spaces. */
static void
list_names (struct cbwd_session *s, char *out, size_t outlen)
{
  uint8_t b[32];
  size_t pos = s->out.len, n = 0;
  uint32_t len, t;
  out[0] = 0;
  cbwd_session_feed (s, b, put_opt (b, NBD_OPT_LIST, NULL, 0));
  while ((t = next_reply (s, &pos, &len)) == NBD_REP_SERVER) {
    const uint8_t *p = s->out.data + pos - len;
    uint32_t nl = get_be32 (p);
    n += snprintf (out + n, outlen - n, "%s%.*s", n ? " " : "", (int) nl, (const char *) p + 4);
  }
  cr_assert_eq (t, NBD_REP_ACK);
  s->out.len = 0;
}

/* The option reply bytes for opt on export name (session left as is). */
static size_t
reply_bytes (struct cbwd_session *s, uint32_t opt, const char *name, uint8_t *out, size_t max)
{
  uint8_t b[256], d[128];
  size_t dl;
  if (opt == NBD_OPT_LIST_META_CONTEXT) {
    uint32_t n = strlen (name);
    put_be32 (d, n); memcpy (d + 4, name, n); put_be32 (d + 4 + n, 0);
    dl = 8 + n;
  }
  else
    dl = go_data (d, name);
  s->out.len = 0;
  cbwd_session_feed (s, b, put_opt (b, opt, d, dl));
  cr_assert (s->out.len <= max);
  memcpy (out, s->out.data, s->out.len);
  return s->out.len;
}

Test (session, authz_refused_is_missing)
{
  struct cbwd_session s;
  char names[128];
  authz_start (&s, true, "psk:bob");
  list_names (&s, names, sizeof names);
  cr_assert_str_eq (names, "");
  static const uint32_t opts[] = { NBD_OPT_INFO, NBD_OPT_GO, NBD_OPT_LIST_META_CONTEXT };
  for (size_t i = 0; i < 3; i++) {
    uint8_t a[512], m[512];
    size_t al = reply_bytes (&s, opts[i], "ro", a, sizeof a);
    size_t ml = reply_bytes (&s, opts[i], "rx", m, sizeof m);
    cr_assert (al > 20);
    cr_assert_eq (get_be32 (a + 12), NBD_REP_ERR_UNKNOWN);
    /* same bytes but for the name inside the message */
    cr_assert_eq (al, ml);
    for (size_t k = 0; k < al; k++)
      if (a[k] != m[k])
        cr_assert (a[k] == 'o' && m[k] == 'x', "option %u: byte %zu differs", opts[i], k);
    cr_assert_eq (reply_bytes (&s, opts[i], "mem", a, sizeof a) > 20, true);
    cr_assert_eq (get_be32 (a + 12), NBD_REP_ERR_UNKNOWN);
  }
  cr_assert_eq (s.state, SS_OPT_HEADER);
  /* EXPORT_NAME of a refused export closes, as for a missing one */
  uint8_t b[64];
  cbwd_session_feed (&s, b, put_opt (b, NBD_OPT_EXPORT_NAME, "ro", 2));
  cr_assert (cbwd_session_closed (&s));
  cr_assert_null (s.exp);
  cbwd_session_free (&s);
}

Test (session, authz_allowed_identity_and_unix)
{
  struct cbwd_session s;
  char names[128];
  authz_start (&s, true, "psk:alice");
  list_names (&s, names, sizeof names);
  cr_assert_str_eq (names, "ro");            /* mem (a "store") is not on TCP */
  go (&s, "ro", false);
  cr_assert_eq (s.exp, ro);
  cbwd_session_free (&s);
  /* no identity (plain TCP): neither */
  authz_start (&s, true, NULL);
  list_names (&s, names, sizeof names);
  cr_assert_str_eq (names, "");
  cbwd_session_free (&s);
  /* Unix listener: everything */
  authz_start (&s, false, NULL);
  list_names (&s, names, sizeof names);
  cr_assert_str_eq (names, "mem ro");
  go (&s, "mem", false);
  cbwd_session_free (&s);
}

Test (session, authz_rules)
{
  struct cbw_err err = { 0 };
  struct cbwd_export *e = cbwd_export_memory_new ("e", 4096, true, &err);
  cr_assert_not_null (e);
  cr_assert (cbwd_export_allowed (e, true, NULL));        /* no list: open */
  e->tcp_deny_default = true;
  cr_assert (!cbwd_export_allowed (e, true, "psk:a"));    /* store default */
  cr_assert (cbwd_export_allowed (e, false, NULL));       /* Unix */
  cr_assert (cbwd_export_allow (e, "psk:a", &err) == 0);
  cr_assert (cbwd_export_allowed (e, true, "psk:a"));
  cr_assert (!cbwd_export_allowed (e, true, "psk:ab"));
  cr_assert (!cbwd_export_allowed (e, true, "x509:psk:a"));
  cr_assert (!cbwd_export_allowed (e, true, NULL));
  cr_assert (cbwd_export_allow (e, "*", &err) == 0);
  cr_assert (cbwd_export_allowed (e, true, NULL));
  static const char *const bad[] = { "", "a", "psk:", "x509:", "PSK:a", "tcp:a" };
  for (size_t i = 0; i < sizeof bad / sizeof *bad; i++)
    cr_assert (cbwd_export_allow (e, bad[i], &err) == -1, "'%s' accepted", bad[i]);
  cbwd_export_free (e);
}

/* A readable set (an incremental with readable=changed): a read is
 * allowed only if one dirty run covers it; otherwise the first clean byte
 * is named.  Edges: a read ending exactly at a run's end, one crossing it,
 * one starting in a gap, one between two runs that touch nothing. */
Test (meta, bitmap_first_clean)
{
  struct cbw_err err = { 0 };
  static const uint64_t r[][2] = { { 4096, 8192 }, { 0, 512 }, { 8192, 100 }, { 100000, 1 } };
  struct cbwd_meta m;
  uint64_t c = 0;
  cr_assert (cbwd_meta_bitmap_from_ranges (&m, "bm", r, 4, 1 << 20, &err) == 0, "%s", err.msg);
  cr_assert_not (cbwd_meta_bitmap_first_clean (&m, 0, 512, &c));
  cr_assert_not (cbwd_meta_bitmap_first_clean (&m, 4096, 8192, &c));
  cr_assert_not (cbwd_meta_bitmap_first_clean (&m, 12287, 1, &c));
  cr_assert_not (cbwd_meta_bitmap_first_clean (&m, 100000, 1, &c));
  cr_assert (cbwd_meta_bitmap_first_clean (&m, 0, 513, &c));
  cr_assert_eq (c, 512);
  cr_assert (cbwd_meta_bitmap_first_clean (&m, 12000, 4096, &c));
  cr_assert_eq (c, 12288);
  cr_assert (cbwd_meta_bitmap_first_clean (&m, 600, 10, &c));
  cr_assert_eq (c, 600);
  cr_assert (cbwd_meta_bitmap_first_clean (&m, 2048, 4096, &c));    /* gap, then dirty */
  cr_assert_eq (c, 2048);
  cr_assert (cbwd_meta_bitmap_first_clean (&m, 200000, 1, &c));     /* past every run */
  cr_assert_eq (c, 200000);
  /* base:allocation is not a bitmap: it never restricts reads */
  struct cbwd_meta base;
  cr_assert (cbwd_meta_base_init (&base) == 0);
  cr_assert_not (cbwd_meta_bitmap_first_clean (&base, 0, 4096, &c));
  base.free (&base);
  m.free (&m);
}
