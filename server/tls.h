/* cbw — server/tls.h: TLS for cbwd's NBD connections (GnuTLS), as a
 * memory-to-memory layer: ciphertext read from the socket goes in with
 * cbwd_tls_input(), plaintext comes out of cbwd_tls_recv(); plaintext to
 * send goes in with cbwd_tls_send() and the ciphertext to write is taken
 * with cbwd_tls_take_output().  No socket I/O and no blocking inside, so
 * the handshake runs on the libuv loop a few bytes at a time and the
 * connection's existing send path (conn.c) writes the ciphertext.
 *
 * Credentials (loaded once at start-up, shared read-only by every session):
 * PSK from a file of `username:hexkey` lines (the format of nbdkit's
 * --tls-psk, libnbd's tls-psk-file and GnuTLS's psktool), or X.509 from a
 * directory with server-cert.pem, server-key.pem and, to verify client
 * certificates, ca-cert.pem (+ optional ca-crl.pem) — the layout nbdkit and
 * QEMU use.
 *
 * Threads: a struct cbwd_tls is not thread-safe; its owner serialises
 * every call on it (conn.c holds the connection's tls_lock).  Credentials
 * are immutable after loading.
 */
#ifndef CBWD_TLS_H
#define CBWD_TLS_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#include "cbw_err.h"

struct cbwd_tls_config {
  int mode;                      /* enum cbwd_tls_mode, or -1: not given */
  char *certificates;            /* directory (X.509) */
  char *psk;                     /* psk file */
  bool verify_peer;              /* X.509: require a client certificate signed by the CA */
};

struct cbwd_tls_creds;
struct cbwd_tls;

/* Parse "off" | "on" | "require"; returns the mode or -1. */
int cbwd_tls_parse_mode (const char *s);
const char *cbwd_tls_mode_name (int mode);

/* Load the credentials the config names (exactly one of psk/certificates).
 * Returns NULL after setting err. */
struct cbwd_tls_creds *cbwd_tls_creds_load (const struct cbwd_tls_config *cfg,
                                            struct cbw_err *err);
void cbwd_tls_creds_free (struct cbwd_tls_creds *cr);
/* "PSK" or "X.509" */
const char *cbwd_tls_creds_kind (const struct cbwd_tls_creds *cr);

/* A server-side TLS session. */
struct cbwd_tls *cbwd_tls_new (const struct cbwd_tls_creds *cr, struct cbw_err *err);
void cbwd_tls_free (struct cbwd_tls *t);
/* Ciphertext from the peer (copied).  Returns 0 or -1 (out of memory). */
int cbwd_tls_input (struct cbwd_tls *t, const void *buf, size_t len);
/* Advance the handshake with the input so far: 1 done, 0 needs more
 * input (send the output first), -1 failed (err says why; the output may
 * hold an alert for the peer). */
int cbwd_tls_handshake (struct cbwd_tls *t, struct cbw_err *err);
/* Decrypt into buf: bytes (> 0), 0 when more input is needed, -1 on end
 * of stream (peer's close_notify: errnum 0) or error (err set). */
ssize_t cbwd_tls_recv (struct cbwd_tls *t, void *buf, size_t len, struct cbw_err *err);
/* Encrypt len bytes into the output.  Returns 0 or -1 (err set). */
int cbwd_tls_send (struct cbwd_tls *t, const void *buf, size_t len, struct cbw_err *err);
/* Queue the TLS close_notify alert in the output (end of our sending). */
void cbwd_tls_bye (struct cbwd_tls *t);
/* Hand over the ciphertext produced so far (malloc'd; NULL and *len = 0
 * if there is none). */
uint8_t *cbwd_tls_take_output (struct cbwd_tls *t, size_t *len);
/* The authenticated peer after the handshake: "psk:USERNAME",
 * "x509:DN" (verified client certificate) or NULL (anonymous X.509 client). */
const char *cbwd_tls_identity (const struct cbwd_tls *t);
/* "TLS1.3 ..." for logs (static or session-owned string). */
const char *cbwd_tls_description (struct cbwd_tls *t, char *buf, size_t len);

#endif
