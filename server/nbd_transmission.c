/* cbw — server/nbd_transmission.c: the transmission phase: request header
 * parsing and validation, running a request against its export, and building
 * simple or structured replies (OFFSET_DATA / OFFSET_HOLE, BLOCK_STATUS,
 * ERROR with a message).
 *
 * Validation distrusts every field: unknown commands and flags, flags not
 * valid for the command or not advertised, offset/length outside the export,
 * lengths over the advertised maximum, writes to read-only exports, block
 * status without negotiated contexts.  Each gets the protocol's error reply;
 * a WRITE's payload is still consumed (discarded) so the stream stays in
 * sync.  Only a bad request magic closes the connection (the stream cannot
 * be resynchronised).
 *
 * Threads: cbwd_tx_parse() runs on the connection's thread;
 * cbwd_request_execute() on a worker thread; cbwd_reply_build() on either.
 * A request is owned by one thread at a time (nbd_session.h); no locks here.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "bufcache.h"
#include "nbd_proto.h"
#include "nbd_session.h"

/* READ and WRITE buffers come from the buffer cache; above its largest
 * class they would be plain mallocs, paying a fresh mapping each time. */
_Static_assert (CBWD_MAX_PAYLOAD <= CBW_BUF_MAX,
                "cbwd's largest payload must fit the buffer cache's classes");

uint32_t
cbwd_nbd_errno (int err)
{
  switch (err) {
  case 0: return 0;
  case EPERM: case EROFS: case EACCES: return NBD_EPERM;
  case EIO: return NBD_EIO;
  case ENOMEM: return NBD_ENOMEM;
  case EINVAL: return NBD_EINVAL;
  case ENOSPC: case EDQUOT: case EFBIG: return NBD_ENOSPC;
  case EOVERFLOW: return NBD_EOVERFLOW;
  case ENOTSUP: return NBD_ENOTSUP;
  case ESHUTDOWN: return NBD_ESHUTDOWN;
  default: return NBD_EIO;
  }
}

void
cbwd_request_free (struct cbwd_request *r)
{
  if (!r) return;
  cbw_buf_free (r->payload, r->length);
  cbw_buf_free (r->data, r->length);
  cbwd_holes_free (&r->holes);
  for (size_t i = 0; i < r->nctx; i++)
    cbwd_extents_free (&r->ctx[i].x);
  free (r->ctx);
  free (r);
}

static bool
is_write_cmd (uint16_t t)
{
  return t == NBD_CMD_WRITE || t == NBD_CMD_TRIM || t == NBD_CMD_WRITE_ZEROES;
}

/* Validate; returns an errno (0 = valid) and a message. */
static int
validate (struct cbwd_session *s, struct cbwd_request *r, const char **msg)
{
  const struct cbwd_export *e = s->exp;
  uint16_t f = r->flags;
  if (r->type > NBD_CMD_BLOCK_STATUS) { *msg = "unknown command"; return EINVAL; }
  if (f & ~NBD_CMD_FLAG_MASK) { *msg = "unknown command flags"; return EINVAL; }
  if ((f & NBD_CMD_FLAG_FUA) && !(s->eflags & NBD_FLAG_SEND_FUA) && is_write_cmd (r->type)) {
    *msg = "FUA not supported on this export"; return EINVAL;
  }
  if ((f & (NBD_CMD_FLAG_NO_HOLE | NBD_CMD_FLAG_FAST_ZERO)) && r->type != NBD_CMD_WRITE_ZEROES) {
    *msg = "NO_HOLE/FAST_ZERO flags are only valid on WRITE_ZEROES"; return EINVAL;
  }
  if ((f & NBD_CMD_FLAG_FAST_ZERO) && !(s->eflags & NBD_FLAG_SEND_FAST_ZERO)) {
    *msg = "FAST_ZERO not supported on this export"; return EINVAL;
  }
  if ((f & NBD_CMD_FLAG_DF) && (r->type != NBD_CMD_READ || !s->structured)) {
    *msg = "DF flag is only valid on READ with structured replies"; return EINVAL;
  }
  if ((f & NBD_CMD_FLAG_REQ_ONE) && r->type != NBD_CMD_BLOCK_STATUS) {
    *msg = "REQ_ONE flag is only valid on BLOCK_STATUS"; return EINVAL;
  }
  if (is_write_cmd (r->type) && (s->eflags & NBD_FLAG_READ_ONLY)) {
    *msg = "export is read-only"; return EPERM;
  }
  switch (r->type) {
  case NBD_CMD_TRIM:
    if (!(s->eflags & NBD_FLAG_SEND_TRIM)) { *msg = "TRIM not supported"; return EINVAL; }
    break;
  case NBD_CMD_WRITE_ZEROES:
    if (!(s->eflags & NBD_FLAG_SEND_WRITE_ZEROES)) { *msg = "WRITE_ZEROES not supported"; return EINVAL; }
    break;
  case NBD_CMD_CACHE:
    if (!(s->eflags & NBD_FLAG_SEND_CACHE)) { *msg = "CACHE not supported"; return EINVAL; }
    break;
  case NBD_CMD_FLUSH:
    return 0;                    /* offset/length are unused */
  case NBD_CMD_BLOCK_STATUS:
    if (!s->structured || s->nsel == 0) {
      *msg = "no metadata context negotiated"; return EINVAL;
    }
    if (r->length == 0) { *msg = "zero-length block status"; return EINVAL; }
    break;
  }
  if ((r->type == NBD_CMD_READ || r->type == NBD_CMD_WRITE) && r->length > CBWD_MAX_PAYLOAD) {
    *msg = "request length exceeds the maximum block size"; return EINVAL;
  }
  if (r->offset > e->size || r->length > e->size - r->offset) {
    *msg = "request beyond the end of the export";
    return (r->type == NBD_CMD_WRITE || r->type == NBD_CMD_WRITE_ZEROES) ? ENOSPC : EINVAL;
  }
  return 0;
}

int
cbwd_tx_parse (struct cbwd_session *s, const uint8_t hdr[28],
               struct cbwd_request **out, uint32_t *payload, bool *discard)
{
  *out = NULL;
  *payload = 0;
  *discard = false;
  if (get_be32 (hdr) != NBD_REQUEST_MAGIC)
    return -1;
  uint16_t type = get_be16 (hdr + 6);
  if (type == NBD_CMD_DISC)
    return 1;
  struct cbwd_request *r = calloc (1, sizeof *r);
  if (!r)
    return -1;
  r->flags = get_be16 (hdr + 4);
  r->type = type;
  r->cookie = get_be64 (hdr + 8);
  r->offset = get_be64 (hdr + 16);
  r->length = get_be32 (hdr + 24);
  r->exp = s->exp;
  r->structured = s->structured;
  const char *msg = NULL;
  int e = validate (s, r, &msg);
  if (e) {
    r->preset_errno = e;
    r->preset_msg = msg;
  }
  else if (type == NBD_CMD_BLOCK_STATUS) {
    r->ctx = calloc (s->nsel, sizeof *r->ctx);
    if (!r->ctx) { r->preset_errno = ENOMEM; r->preset_msg = "out of memory"; }
    else {
      r->nctx = s->nsel;
      for (size_t i = 0; i < s->nsel; i++)
        r->ctx[i].id = s->sel[i];
    }
  }
  if (type == NBD_CMD_WRITE && r->length > 0) {
    *payload = r->length;
    if (!r->preset_errno) {
      r->payload = cbw_buf_alloc (r->length);
      if (!r->payload) { r->preset_errno = ENOMEM; r->preset_msg = "out of memory"; }
    }
    *discard = r->preset_errno != 0;
  }
  *out = r;
  return 0;
}

static void
run_block_status (struct cbwd_request *r)
{
  struct cbwd_export *e = r->exp;
  size_t max = (r->flags & NBD_CMD_FLAG_REQ_ONE) ? 1 : CBWD_MAX_EXTENTS;
  for (size_t i = 0; i < r->nctx; i++) {
    struct cbwd_meta *m = &e->metas[r->ctx[i].id];
    cbwd_extents_init (&r->ctx[i].x, r->offset, r->length, max);
    if (m->extents (e, m, &r->ctx[i].x, &r->err) == -1)
      return;
    if (r->ctx[i].x.n == 0) {
      cbw_err_set (&r->err, EIO, "%s: no extents for offset %llu", m->name,
                   (unsigned long long) r->offset);
      return;
    }
  }
}

bool
cbwd_request_try_nowait (struct cbwd_request *r)
{
  struct cbwd_export *e = r->exp;
  if (r->preset_errno || r->length == 0)
    return false;
  if (r->type == NBD_CMD_READ && e->ops->pread_nowait) {
    r->data = cbw_buf_alloc (r->length);
    if (!r->data) return false;
    if (e->ops->pread_nowait (e, r->data, r->length, r->offset) == 0)
      return true;
    cbw_buf_free (r->data, r->length);
    r->data = NULL;
    return false;
  }
  if (r->type == NBD_CMD_WRITE && e->ops->pwrite_nowait && !(r->flags & NBD_CMD_FLAG_FUA) &&
      e->ops->pwrite_nowait (e, r->payload, r->length, r->offset) == 0) {
    cbw_buf_free (r->payload, r->length);
    r->payload = NULL;
    return true;
  }
  return false;
}

void
cbwd_request_execute (struct cbwd_request *r)
{
  if (r->preset_errno)
    return;
  struct cbwd_export *e = r->exp;
  bool fua = r->flags & NBD_CMD_FLAG_FUA;
  int rc = 0;
  switch (r->type) {
  case NBD_CMD_READ:
    if (r->length == 0) break;
    r->data = cbw_buf_alloc (r->length);
    if (!r->data) { cbw_err_set (&r->err, ENOMEM, "out of memory"); return; }
    rc = e->ops->pread (e, r->data, r->length, r->offset,
                        (r->structured && !(r->flags & NBD_CMD_FLAG_DF)) ? &r->holes : NULL,
                        &r->err);
    break;
  case NBD_CMD_WRITE:
    if (r->length == 0) break;
    rc = e->ops->pwrite (e, r->payload, r->length, r->offset, fua, &r->err);
    cbw_buf_free (r->payload, r->length);
    r->payload = NULL;
    break;
  case NBD_CMD_FLUSH:
    rc = e->ops->flush (e, &r->err);
    break;
  case NBD_CMD_TRIM:
    if (r->length == 0) break;
    rc = e->ops->trim (e, r->length, r->offset, fua, &r->err);
    break;
  case NBD_CMD_CACHE:
    if (r->length == 0) break;
    rc = e->ops->cache (e, r->length, r->offset, &r->err);
    break;
  case NBD_CMD_WRITE_ZEROES:
    if (r->length == 0) break;
    rc = e->ops->zero (e, r->length, r->offset, !(r->flags & NBD_CMD_FLAG_NO_HOLE),
                       r->flags & NBD_CMD_FLAG_FAST_ZERO, fua, &r->err);
    break;
  case NBD_CMD_BLOCK_STATUS:
    run_block_status (r);
    break;
  }
  if (rc == -1 && r->err.errnum == 0)
    cbw_err_set (&r->err, EIO, "I/O error");
}

static void
seg_hdr (struct cbwd_reply *rep, size_t from)
{
  rep->seg[rep->nseg].in_hdr = true;
  rep->seg[rep->nseg].off = from;
  rep->seg[rep->nseg].len = rep->hdr.len - from;
  rep->nseg++;
}

static void
chunk_header (struct cbwd_obuf *b, uint16_t flags, uint16_t type, uint64_t cookie,
              uint32_t len)
{
  cbwd_obuf_be32 (b, NBD_STRUCTURED_REPLY_MAGIC);
  cbwd_obuf_be16 (b, flags);
  cbwd_obuf_be16 (b, type);
  cbwd_obuf_be64 (b, cookie);
  cbwd_obuf_be32 (b, len);
}

int
cbwd_reply_build (struct cbwd_request *r, struct cbwd_reply *rep)
{
  memset (rep, 0, sizeof *rep);
  int err = r->preset_errno ? r->preset_errno : r->err.errnum;
  const char *msg = r->preset_errno ? r->preset_msg : r->err.msg;
  size_t maxseg = 4 + 2 * (r->holes.n + 1);
  rep->seg = calloc (maxseg, sizeof *rep->seg);
  if (!rep->seg) return -1;

  if (!r->structured) {
    cbwd_obuf_be32 (&rep->hdr, NBD_SIMPLE_REPLY_MAGIC);
    cbwd_obuf_be32 (&rep->hdr, cbwd_nbd_errno (err));
    cbwd_obuf_be64 (&rep->hdr, r->cookie);
    seg_hdr (rep, 0);
    if (!err && r->type == NBD_CMD_READ && r->length) {
      rep->seg[rep->nseg].in_hdr = false;
      rep->seg[rep->nseg].off = 0;
      rep->seg[rep->nseg].len = r->length;
      rep->nseg++;
    }
    return rep->hdr.failed ? -1 : 0;
  }

  if (err) {
    size_t ml = msg ? strlen (msg) : 0;
    if (ml > 1024) ml = 1024;
    chunk_header (&rep->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_ERROR, r->cookie, 6 + ml);
    cbwd_obuf_be32 (&rep->hdr, cbwd_nbd_errno (err));
    cbwd_obuf_be16 (&rep->hdr, (uint16_t) ml);
    cbwd_obuf_put (&rep->hdr, msg, ml);
    seg_hdr (rep, 0);
    return rep->hdr.failed ? -1 : 0;
  }

  if (r->type == NBD_CMD_READ && r->length > 0) {
    /* Data and hole chunks in offset order; the last one carries DONE. */
    uint32_t pos = 0;
    size_t hi = 0;
    while (pos < r->length) {
      size_t from = rep->hdr.len;
      bool hole = hi < r->holes.n && r->holes.h[hi].off == pos;
      uint32_t n;
      if (hole) n = r->holes.h[hi++].len;
      else n = (hi < r->holes.n ? r->holes.h[hi].off : r->length) - pos;
      bool last = pos + n >= r->length;
      uint16_t fl = last ? NBD_REPLY_FLAG_DONE : 0;
      if (hole) {
        chunk_header (&rep->hdr, fl, NBD_REPLY_TYPE_OFFSET_HOLE, r->cookie, 12);
        cbwd_obuf_be64 (&rep->hdr, r->offset + pos);
        cbwd_obuf_be32 (&rep->hdr, n);
        seg_hdr (rep, from);
      }
      else {
        chunk_header (&rep->hdr, fl, NBD_REPLY_TYPE_OFFSET_DATA, r->cookie, 8 + n);
        cbwd_obuf_be64 (&rep->hdr, r->offset + pos);
        seg_hdr (rep, from);
        rep->seg[rep->nseg].in_hdr = false;
        rep->seg[rep->nseg].off = pos;
        rep->seg[rep->nseg].len = n;
        rep->nseg++;
      }
      pos += n;
    }
    return rep->hdr.failed ? -1 : 0;
  }

  if (r->type == NBD_CMD_BLOCK_STATUS) {
    for (size_t i = 0; i < r->nctx; i++) {
      const struct cbwd_extents *x = &r->ctx[i].x;
      chunk_header (&rep->hdr, i + 1 == r->nctx ? NBD_REPLY_FLAG_DONE : 0,
                    NBD_REPLY_TYPE_BLOCK_STATUS, r->cookie, 4 + 8 * x->n);
      cbwd_obuf_be32 (&rep->hdr, r->ctx[i].id);
      for (size_t j = 0; j < x->n; j++) {
        cbwd_obuf_be32 (&rep->hdr, x->e[j].length);
        cbwd_obuf_be32 (&rep->hdr, x->e[j].flags);
      }
    }
    seg_hdr (rep, 0);
    return rep->hdr.failed ? -1 : 0;
  }

  /* Everything else (and zero-length reads): NONE + DONE. */
  chunk_header (&rep->hdr, NBD_REPLY_FLAG_DONE, NBD_REPLY_TYPE_NONE, r->cookie, 0);
  seg_hdr (rep, 0);
  return rep->hdr.failed ? -1 : 0;
}

void
cbwd_reply_free (struct cbwd_reply *rep)
{
  cbwd_obuf_free (&rep->hdr);
  free (rep->seg);
  rep->seg = NULL;
  rep->nseg = 0;
}
