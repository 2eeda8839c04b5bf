/* cbw — server/nbd_session.c: framing of the NBD byte stream for one
 * connection: client flags, option headers and data, request headers and
 * WRITE payloads, in any fragmentation the transport delivers.  Option
 * semantics are in nbd_handshake.c, request semantics in nbd_transmission.c.
 *
 * Memory: option data is buffered only up to CBWD_MAX_OPTION_LEN (longer
 * options are answered NBD_REP_ERR_TOO_BIG and their data discarded as it
 * streams in); a WRITE payload is buffered only after the header validated
 * (<= CBWD_MAX_PAYLOAD), else it is discarded.  So one session holds at most
 * one option or one payload buffer; the owner (conn.c) bounds the number of
 * requests in flight.
 *
 * Threads: the owner's thread only (see nbd_session.h).
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "nbd_proto.h"
#include "nbd_session.h"

void
cbwd_session_init (struct cbwd_session *s, const struct cbwd_exports *exports,
                   const struct cbwd_session_ops *ops, void *opaque)
{
  memset (s, 0, sizeof *s);
  s->exports = exports;
  s->ops = ops;
  s->opaque = opaque;
  s->state = SS_CLIENT_FLAGS;
  cbwd_hs_greeting (s);
}

void
cbwd_session_free (struct cbwd_session *s)
{
  free (s->optbuf);
  free (s->sel);
  cbwd_export_unref (s->meta_export);
  cbwd_export_unref (s->exp);
  s->meta_export = s->exp = NULL;
  if (s->cur) cbwd_request_free (s->cur);
  if (s->rejected) cbwd_request_free (s->rejected);
  cbwd_obuf_free (&s->out);
  s->optbuf = NULL; s->sel = NULL; s->cur = s->rejected = NULL;
}

static void
close_session (struct cbwd_session *s, const char *why)
{
  if (s->state != SS_CLOSED && why && !s->close_reason)
    s->close_reason = why;
  s->state = SS_CLOSED;
}

static void
handle_option (struct cbwd_session *s, const uint8_t *data, uint32_t len)
{
  if (cbwd_hs_option (s, s->opt, data, len) == -1)
    close_session (s, "handshake ended");
  else if (s->state != SS_REQ_HEADER && s->state != SS_STARTTLS) {
    s->state = SS_OPT_HEADER;
    s->hdr_have = 0;
  }
}

static void
got_request_header (struct cbwd_session *s)
{
  struct cbwd_request *r = NULL;
  uint32_t payload = 0;
  bool discard = false;
  int rc = cbwd_tx_parse (s, s->hdr, &r, &payload, &discard);
  s->hdr_have = 0;
  if (rc == -1) { close_session (s, "bad request magic"); return; }
  if (rc == 1) { close_session (s, "client sent NBD_CMD_DISC"); return; }
  if (payload == 0) {
    s->ops->request (s->opaque, r);
    return;
  }
  if (discard) {
    s->rejected = r;
    s->discard_left = payload;
    s->state = SS_REQ_DISCARD;
    return;
  }
  s->cur = r;
  s->cur->payload_have = 0;
  s->state = SS_REQ_PAYLOAD;
}

size_t
cbwd_session_feed (struct cbwd_session *s, const uint8_t *buf, size_t len)
{
  size_t total = len;
  while (len > 0 && s->state != SS_CLOSED && s->state != SS_STARTTLS) {
    size_t n;
    switch (s->state) {
    case SS_CLIENT_FLAGS:
    case SS_OPT_HEADER:
    case SS_REQ_HEADER: {
      size_t want = s->state == SS_CLIENT_FLAGS ? 4 : s->state == SS_OPT_HEADER ? 16 : 28;
      n = want - s->hdr_have;
      if (n > len) n = len;
      memcpy (s->hdr + s->hdr_have, buf, n);
      s->hdr_have += n; buf += n; len -= n;
      if (s->hdr_have < want) break;
      s->hdr_have = 0;
      if (s->state == SS_CLIENT_FLAGS) {
        s->client_flags = get_be32 (s->hdr);
        if (s->client_flags & ~(NBD_FLAG_C_FIXED_NEWSTYLE | NBD_FLAG_C_NO_ZEROES))
          close_session (s, "unknown client flags");
        else if (s->tls_mode == CBWD_TLS_REQUIRE &&
                 !(s->client_flags & NBD_FLAG_C_FIXED_NEWSTYLE))
          /* TLS needs fixed newstyle; without it only EXPORT_NAME could
           * follow, which must not be served before TLS. */
          close_session (s, "TLS required but the client does not support fixed newstyle");
        else
          s->state = SS_OPT_HEADER;
      }
      else if (s->state == SS_OPT_HEADER) {
        if (get_be64 (s->hdr) != NBD_IHAVEOPT) { close_session (s, "bad option magic"); break; }
        if (++s->nopts > CBWD_MAX_OPTIONS) { close_session (s, "too many options"); break; }
        s->opt = get_be32 (s->hdr + 8);
        s->optlen = get_be32 (s->hdr + 12);
        if (s->optlen > CBWD_MAX_OPTION_LEN) {
          if (s->opt == NBD_OPT_EXPORT_NAME) { close_session (s, "export name too long"); break; }
          s->discard_left = s->optlen;
          s->state = SS_OPT_DISCARD;
        }
        else if (s->optlen == 0)
          handle_option (s, NULL, 0);
        else {
          s->optbuf = malloc (s->optlen);
          if (!s->optbuf) { close_session (s, "out of memory"); break; }
          s->opt_have = 0;
          s->state = SS_OPT_DATA;
        }
      }
      else
        got_request_header (s);
      break;
    }
    case SS_OPT_DATA:
      n = s->optlen - s->opt_have;
      if (n > len) n = len;
      memcpy (s->optbuf + s->opt_have, buf, n);
      s->opt_have += n; buf += n; len -= n;
      if (s->opt_have == s->optlen) {
        uint8_t *d = s->optbuf;
        s->optbuf = NULL;
        handle_option (s, d, s->optlen);
        free (d);
      }
      break;
    case SS_OPT_DISCARD:
    case SS_REQ_DISCARD:
      n = s->discard_left < len ? s->discard_left : len;
      s->discard_left -= n; buf += n; len -= n;
      if (s->discard_left == 0) {
        if (s->state == SS_OPT_DISCARD) {
          if (s->tls_mode == CBWD_TLS_REQUIRE && !s->tls_active &&
              s->opt != NBD_OPT_ABORT && s->opt != NBD_OPT_STARTTLS)
            cbwd_hs_reply (s, s->opt, NBD_REP_ERR_TLS_REQD, "TLS required", 12);
          else
            cbwd_hs_reply (s, s->opt, NBD_REP_ERR_TOO_BIG, "option too long", 15);
          s->state = SS_OPT_HEADER;
        }
        else {
          struct cbwd_request *r = s->rejected;
          s->rejected = NULL;
          s->state = SS_REQ_HEADER;
          s->ops->request (s->opaque, r);
        }
      }
      break;
    case SS_REQ_PAYLOAD: {
      struct cbwd_request *r = s->cur;
      n = r->length - r->payload_have;
      if (n > len) n = len;
      memcpy (r->payload + r->payload_have, buf, n);
      r->payload_have += n; buf += n; len -= n;
      if (r->payload_have == r->length) {
        s->cur = NULL;
        s->state = SS_REQ_HEADER;
        s->ops->request (s->opaque, r);
      }
      break;
    }
    case SS_STARTTLS:
    case SS_CLOSED:
      break;
    }
  }
  if (s->out.failed)
    close_session (s, "out of memory");
  return total - len;
}

void
cbwd_session_tls_done (struct cbwd_session *s)
{
  if (s->state != SS_STARTTLS)
    return;
  cbwd_hs_tls_reset (s);
  s->tls_active = true;
  s->state = SS_OPT_HEADER;
  s->hdr_have = 0;
}

uint8_t *
cbwd_session_direct_buf (struct cbwd_session *s, size_t *n)
{
  if (s->state != SS_REQ_PAYLOAD)
    return NULL;
  size_t left = s->cur->length - s->cur->payload_have;
  if (left < 65536)
    return NULL;
  *n = left;
  return s->cur->payload + s->cur->payload_have;
}

void
cbwd_session_direct_done (struct cbwd_session *s, size_t n)
{
  struct cbwd_request *r = s->cur;
  r->payload_have += n;
  if (r->payload_have == r->length) {
    s->cur = NULL;
    s->state = SS_REQ_HEADER;
    s->ops->request (s->opaque, r);
  }
}
