/* cbw — server/nbd_handshake.c: the fixed-newstyle handshake (option
 * haggling) of the NBD protocol: EXPORT_NAME, ABORT, LIST, STARTTLS, INFO,
 * GO, STRUCTURED_REPLY, LIST_META_CONTEXT, SET_META_CONTEXT, and the
 * NBD_INFO_EXPORT/NAME/DESCRIPTION/BLOCK_SIZE information items.
 *
 * TLS (spec "TLS support"): with tls_mode OFF STARTTLS is answered
 * NBD_REP_ERR_UNSUP; otherwise the first STARTTLS without data gets
 * NBD_REP_ACK and the session stops in SS_STARTTLS until its owner ran the
 * TLS handshake (conn.c + tls.c); a second one gets NBD_REP_ERR_INVALID.
 * With REQUIRE, every other option except ABORT is answered
 * NBD_REP_ERR_TLS_REQD before TLS, and EXPORT_NAME (which cannot be
 * answered with an error) closes the connection.
 *
 * Every length inside an option is checked against the option length before
 * use; strings are bounded by NBD_MAX_STRING and must not contain NUL.  A
 * malformed option gets NBD_REP_ERR_INVALID (the client may continue); only
 * EXPORT_NAME failures close the connection, as the spec requires.
 *
 * Authorization: every lookup by name goes through find_export(), which
 * treats an export the client may not open (cbwd_export_allowed) as
 * missing, and LIST shows only what the client may open, so export names
 * do not leak to clients that cannot use them.
 *
 * Threads: runs on the connection's owner thread only; no locking (exports
 * and their context lists are immutable).
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "nbd_proto.h"
#include "nbd_session.h"

#define QEMU_DIRTY_PREFIX "qemu:dirty-bitmap:"

void
cbwd_hs_greeting (struct cbwd_session *s)
{
  cbwd_obuf_be64 (&s->out, NBD_MAGIC);
  cbwd_obuf_be64 (&s->out, NBD_IHAVEOPT);
  cbwd_obuf_be16 (&s->out, NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES);
}

void
cbwd_hs_reply (struct cbwd_session *s, uint32_t opt, uint32_t type,
               const void *data, uint32_t len)
{
  cbwd_obuf_be64 (&s->out, NBD_REP_MAGIC);
  cbwd_obuf_be32 (&s->out, opt);
  cbwd_obuf_be32 (&s->out, type);
  cbwd_obuf_be32 (&s->out, len);
  cbwd_obuf_put (&s->out, data, len);
}

/* Error reply with a human-readable message (allowed by the spec). */
static int
reply_err (struct cbwd_session *s, uint32_t opt, uint32_t type, const char *fmt, ...)
  __attribute__ ((format (printf, 4, 5)));
static int
reply_err (struct cbwd_session *s, uint32_t opt, uint32_t type, const char *fmt, ...)
{
  char msg[256];
  va_list ap;
  va_start (ap, fmt);
  int n = vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  if (n < 0) n = 0;
  if ((size_t) n >= sizeof msg) n = sizeof msg - 1;
  cbwd_hs_reply (s, opt, type, msg, (uint32_t) n);
  if (s->ops && s->ops->log)
    s->ops->log (s->opaque, msg);
  return 0;
}

static bool
valid_string (const uint8_t *p, uint32_t len)
{
  return len <= NBD_MAX_STRING && memchr (p, 0, len) == NULL;
}

/* Context ids of the selection belong to meta_export; forget them. */
static void
clear_selection (struct cbwd_session *s)
{
  free (s->sel);
  s->sel = NULL;
  s->nsel = 0;
  cbwd_export_unref (s->meta_export);
  s->meta_export = NULL;
}

/* The export named (name, len) if it exists and this client may open it. */
static struct cbwd_export *
find_export (struct cbwd_session *s, const uint8_t *name, uint32_t len)
{
  struct cbwd_export *e = cbwd_exports_find (s->exports, (const char *) name, len);
  if (e && !cbwd_export_allowed (e, s->tcp, s->identity))
    return NULL;
  return e;
}

static uint16_t
export_flags (struct cbwd_session *s, const struct cbwd_export *e)
{
  uint16_t f = e->eflags | NBD_FLAG_HAS_FLAGS;
  if (s->structured)
    f |= NBD_FLAG_SEND_DF;
  return f;
}

static void
enter_transmission (struct cbwd_session *s, struct cbwd_export *e)
{
  if (s->meta_export != e)
    clear_selection (s);
  cbwd_export_ref (e);
  s->exp = e;
  s->eflags = export_flags (s, e);
  s->state = SS_REQ_HEADER;
  s->hdr_have = 0;
}

static int
opt_export_name (struct cbwd_session *s, const uint8_t *d, uint32_t len)
{
  if (!valid_string (d, len)) {
    s->close_reason = "NBD_OPT_EXPORT_NAME: bad export name";
    return -1;
  }
  struct cbwd_export *e = find_export (s, d, len);
  if (!e) {
    s->close_reason = "NBD_OPT_EXPORT_NAME: unknown export";
    return -1;
  }
  cbwd_obuf_be64 (&s->out, e->size);
  cbwd_obuf_be16 (&s->out, export_flags (s, e));
  if (!(s->client_flags & NBD_FLAG_C_NO_ZEROES)) {
    static const uint8_t zeroes[124];
    cbwd_obuf_put (&s->out, zeroes, sizeof zeroes);
  }
  enter_transmission (s, e);
  return 0;
}

static int
opt_list (struct cbwd_session *s, uint32_t opt, uint32_t len)
{
  if (len != 0)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "NBD_OPT_LIST: unexpected data");
  for (size_t i = 0; i < s->exports->n; i++) {
    const struct cbwd_export *e = s->exports->v[i];
    if (!cbwd_export_allowed (e, s->tcp, s->identity))
      continue;
    uint32_t nl = strlen (e->name);
    uint32_t dl = e->description ? strlen (e->description) : 0;
    uint8_t l[4];
    put_be32 (l, nl);
    cbwd_obuf_be64 (&s->out, NBD_REP_MAGIC);
    cbwd_obuf_be32 (&s->out, opt);
    cbwd_obuf_be32 (&s->out, NBD_REP_SERVER);
    cbwd_obuf_be32 (&s->out, 4 + nl + dl);
    cbwd_obuf_put (&s->out, l, 4);
    cbwd_obuf_put (&s->out, e->name, nl);
    cbwd_obuf_put (&s->out, e->description, dl);
  }
  cbwd_hs_reply (s, opt, NBD_REP_ACK, NULL, 0);
  return 0;
}

static void
info_reply (struct cbwd_session *s, uint32_t opt, uint16_t type,
            const void *data, uint32_t len)
{
  cbwd_obuf_be64 (&s->out, NBD_REP_MAGIC);
  cbwd_obuf_be32 (&s->out, opt);
  cbwd_obuf_be32 (&s->out, NBD_REP_INFO);
  cbwd_obuf_be32 (&s->out, 2 + len);
  cbwd_obuf_be16 (&s->out, type);
  cbwd_obuf_put (&s->out, data, len);
}

static int
opt_info_go (struct cbwd_session *s, uint32_t opt, const uint8_t *d, uint32_t len)
{
  const char *what = opt == NBD_OPT_GO ? "NBD_OPT_GO" : "NBD_OPT_INFO";
  if (len < 6)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: option too short", what);
  uint32_t nl = get_be32 (d);
  if (nl > len - 6)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: name length exceeds option", what);
  const uint8_t *name = d + 4;
  uint16_t ninfo = get_be16 (d + 4 + nl);
  if ((uint64_t) 6 + nl + 2ULL * ninfo != len)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: bad information request count", what);
  if (!valid_string (name, nl))
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: bad export name", what);
  struct cbwd_export *e = find_export (s, name, nl);
  if (!e)
    return reply_err (s, opt, NBD_REP_ERR_UNKNOWN, "%s: no export named '%.*s'", what,
                      (int) (nl > 200 ? 200 : nl), (const char *) name);
  bool want_name = false, want_desc = false;
  for (uint16_t i = 0; i < ninfo; i++) {
    uint16_t t = get_be16 (d + 6 + nl + 2 * i);
    if (t == NBD_INFO_NAME) want_name = true;
    else if (t == NBD_INFO_DESCRIPTION) want_desc = true;
    /* NBD_INFO_EXPORT and BLOCK_SIZE are always sent; unknown: ignored. */
  }
  uint8_t b[12];
  put_be64 (b, e->size);
  put_be16 (b + 8, export_flags (s, e));
  info_reply (s, opt, NBD_INFO_EXPORT, b, 10);
  if (want_name)
    info_reply (s, opt, NBD_INFO_NAME, e->name, strlen (e->name));
  if (want_desc && e->description)
    info_reply (s, opt, NBD_INFO_DESCRIPTION, e->description, strlen (e->description));
  put_be32 (b, 1);
  put_be32 (b + 4, CBWD_PREF_BLOCK);
  put_be32 (b + 8, CBWD_MAX_PAYLOAD);
  info_reply (s, opt, NBD_INFO_BLOCK_SIZE, b, 12);
  cbwd_hs_reply (s, opt, NBD_REP_ACK, NULL, 0);
  if (opt == NBD_OPT_GO)
    enter_transmission (s, e);
  return 0;
}

/* Does query q select context name (exact), or, for LIST, a namespace or
 * the qemu:dirty-bitmap: prefix? */
static bool
query_matches (const uint8_t *q, uint32_t ql, const char *name, bool list)
{
  size_t nl = strlen (name);
  if (ql == nl && memcmp (q, name, nl) == 0)
    return true;
  if (!list || ql == 0 || ql > nl)
    return false;
  /* "base:", "qemu:", "qemu:dirty-bitmap:" list everything under them. */
  if (q[ql - 1] != ':' || memcmp (q, name, ql) != 0)
    return false;
  return true;
}

static int
opt_meta (struct cbwd_session *s, uint32_t opt, const uint8_t *d, uint32_t len)
{
  bool list = opt == NBD_OPT_LIST_META_CONTEXT;
  const char *what = list ? "NBD_OPT_LIST_META_CONTEXT" : "NBD_OPT_SET_META_CONTEXT";
  if (!list && !s->structured)
    return reply_err (s, opt, NBD_REP_ERR_INVALID,
                      "%s: structured replies not negotiated", what);
  if (len < 8)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: option too short", what);
  uint32_t nl = get_be32 (d);
  if (nl > len - 8)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: name length exceeds option", what);
  if (!valid_string (d + 4, nl))
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: bad export name", what);
  uint32_t nq = get_be32 (d + 4 + nl);
  if (nq > CBWD_MAX_QUERIES)
    return reply_err (s, opt, NBD_REP_ERR_TOO_BIG, "%s: too many queries", what);
  /* Walk the queries once to validate them all before replying. */
  uint32_t pos = 8 + nl;
  for (uint32_t i = 0; i < nq; i++) {
    if (len - pos < 4)
      return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: truncated query", what);
    uint32_t ql = get_be32 (d + pos);
    if (ql > len - pos - 4)
      return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: query length exceeds option", what);
    if (ql > NBD_MAX_STRING)
      return reply_err (s, opt, NBD_REP_ERR_TOO_BIG, "%s: query too long", what);
    if (memchr (d + pos + 4, 0, ql))
      return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: NUL in query", what);
    pos += 4 + ql;
  }
  if (pos != len)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "%s: trailing data", what);
  struct cbwd_export *e = find_export (s, d + 4, nl);
  if (!e)
    return reply_err (s, opt, NBD_REP_ERR_UNKNOWN, "%s: no export named '%.*s'", what,
                      (int) (nl > 200 ? 200 : nl), (const char *) d + 4);

  /* Mark matches (each context at most once, in export order). */
  bool *hit = calloc (e->nmetas ? e->nmetas : 1, sizeof *hit);
  if (!hit)
    return reply_err (s, opt, NBD_REP_ERR_SHUTDOWN, "%s: out of memory", what);
  if (nq == 0 && list)
    for (size_t j = 0; j < e->nmetas; j++) hit[j] = true;
  pos = 8 + nl;
  for (uint32_t i = 0; i < nq; i++) {
    uint32_t ql = get_be32 (d + pos);
    for (size_t j = 0; j < e->nmetas; j++)
      if (query_matches (d + pos + 4, ql, e->metas[j].name, list))
        hit[j] = true;
    pos += 4 + ql;
  }
  if (!list) {
    clear_selection (s);
    size_t n = 0;
    for (size_t j = 0; j < e->nmetas; j++) n += hit[j];
    if (n) {
      s->sel = malloc (n * sizeof *s->sel);
      if (!s->sel) {
        free (hit);
        return reply_err (s, opt, NBD_REP_ERR_SHUTDOWN, "%s: out of memory", what);
      }
    }
    cbwd_export_ref (e);
    s->meta_export = e;
  }
  for (size_t j = 0; j < e->nmetas; j++) {
    if (!hit[j]) continue;
    uint32_t ml = strlen (e->metas[j].name);
    cbwd_obuf_be64 (&s->out, NBD_REP_MAGIC);
    cbwd_obuf_be32 (&s->out, opt);
    cbwd_obuf_be32 (&s->out, NBD_REP_META_CONTEXT);
    cbwd_obuf_be32 (&s->out, 4 + ml);
    cbwd_obuf_be32 (&s->out, list ? 0 : (uint32_t) j);
    cbwd_obuf_put (&s->out, e->metas[j].name, ml);
    if (!list)
      s->sel[s->nsel++] = (uint32_t) j;
  }
  free (hit);
  cbwd_hs_reply (s, opt, NBD_REP_ACK, NULL, 0);
  return 0;
}

void
cbwd_hs_tls_reset (struct cbwd_session *s)
{
  s->structured = false;
  clear_selection (s);
}

static int
opt_starttls (struct cbwd_session *s, uint32_t opt, uint32_t len)
{
  if (s->tls_mode == CBWD_TLS_OFF)
    return reply_err (s, opt, NBD_REP_ERR_UNSUP, "TLS is not configured on this listener");
  if (s->tls_active)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "TLS is already active");
  if (len != 0)
    return reply_err (s, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STARTTLS: unexpected data");
  cbwd_hs_reply (s, opt, NBD_REP_ACK, NULL, 0);
  s->state = SS_STARTTLS;
  return 0;
}

int
cbwd_hs_option (struct cbwd_session *s, uint32_t opt, const uint8_t *d, uint32_t len)
{
  if (s->tls_mode == CBWD_TLS_REQUIRE && !s->tls_active &&
      opt != NBD_OPT_STARTTLS && opt != NBD_OPT_ABORT) {
    if (opt == NBD_OPT_EXPORT_NAME) {
      s->close_reason = "NBD_OPT_EXPORT_NAME before TLS on a listener that requires TLS";
      return -1;
    }
    return reply_err (s, opt, NBD_REP_ERR_TLS_REQD,
                      "TLS is required on this listener: send NBD_OPT_STARTTLS first");
  }
  switch (opt) {
  case NBD_OPT_EXPORT_NAME:
    return opt_export_name (s, d, len);
  case NBD_OPT_ABORT:
    cbwd_hs_reply (s, opt, NBD_REP_ACK, NULL, 0);
    s->close_reason = "client sent NBD_OPT_ABORT";
    return -1;
  case NBD_OPT_LIST:
    return opt_list (s, opt, len);
  case NBD_OPT_STARTTLS:
    return opt_starttls (s, opt, len);
  case NBD_OPT_INFO:
  case NBD_OPT_GO:
    return opt_info_go (s, opt, d, len);
  case NBD_OPT_STRUCTURED_REPLY:
    if (len != 0)
      return reply_err (s, opt, NBD_REP_ERR_INVALID, "NBD_OPT_STRUCTURED_REPLY: unexpected data");
    if (s->structured)
      return reply_err (s, opt, NBD_REP_ERR_INVALID, "structured replies already negotiated");
    s->structured = true;
    cbwd_hs_reply (s, opt, NBD_REP_ACK, NULL, 0);
    return 0;
  case NBD_OPT_LIST_META_CONTEXT:
  case NBD_OPT_SET_META_CONTEXT:
    return opt_meta (s, opt, d, len);
  default:
    return reply_err (s, opt, NBD_REP_ERR_UNSUP, "option %u not supported", opt);
  }
}
