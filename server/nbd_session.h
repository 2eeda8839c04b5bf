/* cbw — server/nbd_session.h: one NBD connection's protocol state, as a pure
 * byte-stream state machine (no sockets, no libuv), so the same code runs in
 * the server (conn.c), the unit tests and the fuzzer.
 *
 *   bytes in  -> cbwd_session_feed()  -> handshake replies appended to .out,
 *                                        complete requests handed to
 *                                        ops->request() (ownership moves)
 *   request done (any thread) -> cbwd_reply_build() -> bytes to send
 *
 * Framing (nbd_session.c), option handling (nbd_handshake.c) and request
 * parsing/execution/replies (nbd_transmission.c) are separate files.
 *
 * Threads: a session is touched only by the thread that owns the connection
 * (the libuv loop thread).  A struct cbwd_request is owned by exactly one
 * thread at a time: the loop thread while parsing, a worker thread while it
 * executes, the loop thread again while replying.  It carries copies of
 * everything the worker needs (export pointer, selected context ids,
 * structured flag), so the worker never reads the session.
 */
#ifndef CBWD_NBD_SESSION_H
#define CBWD_NBD_SESSION_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cbw_err.h"
#include "export.h"
#include "pool.h"
#include "wire.h"

struct cbwd_request {
  /* From the wire (validated before execution). */
  uint16_t flags, type;
  uint64_t cookie, offset;
  uint32_t length;
  /* Copied from the session at parse time. */
  struct cbwd_export *exp;
  bool structured;
  /* Non-zero: reply with this errno, do not execute. */
  int preset_errno;
  const char *preset_msg;
  uint8_t *payload;                /* WRITE data (length bytes) */
  /* Results, filled by cbwd_request_execute() on a worker thread. */
  struct cbw_err err;              /* err.errnum != 0: failed */
  uint8_t *data;                   /* READ data */
  struct cbwd_holes holes;         /* READ: hole ranges (structured only) */
  size_t nctx;                     /* BLOCK_STATUS: one per selected context */
  struct cbwd_ctx_result { uint32_t id; struct cbwd_extents x; } *ctx;
  /* For the owner (conn.c): its own bookkeeping. */
  void *owner;
  size_t payload_have;
  struct cbwd_job job;             /* conn.c: queued to the worker pool */
  struct cbwd_request *qnext;      /* conn.c: pending queue */
  uint64_t held;                   /* conn.c: bytes it counts in held_bytes */
};

struct cbwd_session_ops {
  /* A complete request (ownership moves to the callee). */
  void (*request) (void *opaque, struct cbwd_request *r);
  /* Log a protocol problem of this client (may be NULL). */
  void (*log) (void *opaque, const char *msg);
};

enum cbwd_sess_state {
  SS_CLIENT_FLAGS,      /* reading u32 client flags */
  SS_OPT_HEADER,        /* reading 16-byte option header */
  SS_OPT_DATA,          /* reading option data into optbuf */
  SS_OPT_DISCARD,       /* discarding oversize option data */
  SS_REQ_HEADER,        /* reading 28-byte request header */
  SS_REQ_PAYLOAD,       /* reading WRITE payload into cur->payload */
  SS_REQ_DISCARD,       /* discarding payload of a rejected WRITE */
  SS_STARTTLS,          /* STARTTLS acknowledged: the owner runs the TLS
                           handshake, then cbwd_session_tls_done() */
  SS_CLOSED,            /* send .out, wait for requests in flight, close */
};

/* TLS modes of a session (NBD spec "TLS support"): OFF answers STARTTLS
 * NBD_REP_ERR_UNSUP; ON is SELECTIVETLS without TLS-only exports (the
 * client may upgrade); REQUIRE is FORCEDTLS (every option but STARTTLS and
 * ABORT is answered NBD_REP_ERR_TLS_REQD until TLS is up). */
enum cbwd_tls_mode { CBWD_TLS_OFF = 0, CBWD_TLS_ON = 1, CBWD_TLS_REQUIRE = 2 };

struct cbwd_session {
  const struct cbwd_exports *exports;
  const struct cbwd_session_ops *ops;
  void *opaque;
  enum cbwd_sess_state state;
  uint8_t hdr[28];
  size_t hdr_have;
  /* Handshake. */
  uint32_t client_flags;
  uint32_t opt, optlen;
  uint8_t *optbuf;
  size_t opt_have;
  uint64_t discard_left;
  unsigned nopts;
  bool structured;
  enum cbwd_tls_mode tls_mode;       /* set by the owner before the first feed */
  bool tls_active;                   /* TLS handshake completed */
  /* Authorization (cbwd_export_allowed): set by the owner.  An export the
   * client may not open is answered exactly like a missing one. */
  bool tcp;                          /* came in on a TCP listener */
  const char *identity;              /* TLS identity (owner's string), or NULL */
  struct cbwd_export *meta_export;   /* export the selection below is for */
  size_t nsel;
  uint32_t *sel;                     /* selected context ids (indices) */
  /* Transmission. */
  struct cbwd_export *exp;
  uint16_t eflags;                   /* as sent to the client */
  struct cbwd_request *cur;          /* WRITE whose payload is being read */
  struct cbwd_request *rejected;     /* WRITE whose payload is discarded */
  /* Bytes to send (handshake replies). */
  struct cbwd_obuf out;
  const char *close_reason;
};

void cbwd_session_init (struct cbwd_session *s, const struct cbwd_exports *exports,
                        const struct cbwd_session_ops *ops, void *opaque);
void cbwd_session_free (struct cbwd_session *s);
/* Consume up to len bytes; returns how many were consumed.  Fewer than len
 * only when the session closed (SS_CLOSED) or acknowledged STARTTLS
 * (SS_STARTTLS): the rest of the bytes belong to the TLS handshake. */
size_t cbwd_session_feed (struct cbwd_session *s, const uint8_t *buf, size_t len);
/* The owner finished the TLS handshake of SS_STARTTLS: option haggling
 * restarts under TLS, with the state negotiated before it forgotten. */
void cbwd_session_tls_done (struct cbwd_session *s);
/* Zero-copy payload reads: where the next n bytes should go if the session
 * is reading a big WRITE payload (NULL otherwise), and the commit. */
uint8_t *cbwd_session_direct_buf (struct cbwd_session *s, size_t *n);
void cbwd_session_direct_done (struct cbwd_session *s, size_t n);
static inline bool cbwd_session_closed (const struct cbwd_session *s)
{ return s->state == SS_CLOSED; }

/* nbd_handshake.c */
void cbwd_hs_greeting (struct cbwd_session *s);
/* Handle one complete option; 0 = continue, -1 = close. */
int cbwd_hs_option (struct cbwd_session *s, uint32_t opt, const uint8_t *data,
                    uint32_t len);
void cbwd_hs_reply (struct cbwd_session *s, uint32_t opt, uint32_t type,
                    const void *data, uint32_t len);
/* Forget what was negotiated before STARTTLS (structured replies, meta
 * context selection), as the spec requires once TLS starts. */
void cbwd_hs_tls_reset (struct cbwd_session *s);

/* nbd_transmission.c */
/* Parse and validate a request header.  Returns -1 (close the connection:
 * bad magic), 0 with *out set (possibly with preset_errno) and *payload =
 * bytes of payload that follow (*discard true: read and drop them), or 1
 * for NBD_CMD_DISC. */
int cbwd_tx_parse (struct cbwd_session *s, const uint8_t hdr[28],
                   struct cbwd_request **out, uint32_t *payload, bool *discard);
/* Loop thread: complete the request without blocking if the export has a
 * fast path and it succeeds (true); else it must go to the pool. */
bool cbwd_request_try_nowait (struct cbwd_request *r);
/* Run a request against its export (worker thread). */
void cbwd_request_execute (struct cbwd_request *r);
void cbwd_request_free (struct cbwd_request *r);
/* The reply: headers in .hdr, and segments referring to .hdr or r->data. */
struct cbwd_reply {
  struct cbwd_obuf hdr;
  size_t nseg;
  struct cbwd_seg { bool in_hdr; size_t off; size_t len; } *seg;
};
int cbwd_reply_build (struct cbwd_request *r, struct cbwd_reply *out);
void cbwd_reply_free (struct cbwd_reply *rep);
/* errno -> NBD wire error. */
uint32_t cbwd_nbd_errno (int err);

#endif
