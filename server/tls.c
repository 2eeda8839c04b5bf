/* cbw — server/tls.c: GnuTLS server sessions over memory buffers (see
 * tls.h).  Design: the session's transport is two buffers owned by struct
 * cbwd_tls: `in` (ciphertext from the peer, consumed by the pull function,
 * which reports EAGAIN when it is empty) and `out` (ciphertext to send,
 * appended by the push function, which never fails short).  So GnuTLS
 * never touches the socket, the handshake advances only as far as the
 * buffered input allows (non-blocking, GNUTLS_NONBLOCK), and a record
 * encrypted by cbwd_tls_send() lands in `out` in sequence order, for the
 * caller to put on the wire in that same order.
 *
 * Ciphersuites: GnuTLS's NORMAL priority (TLS 1.2 and 1.3), plus the PSK key
 * exchanges when a PSK file is used — the same choice as nbdkit, so every
 * client that talks TLS to nbdkit or qemu-nbd talks to cbwd.
 *
 * Threads: no locking here; see tls.h.
 */
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include <gnutls/gnutls.h>
#include <gnutls/x509.h>

#include "nbd_session.h"
#include "tls.h"

struct cbwd_tls_creds {
  gnutls_psk_server_credentials_t psk;          /* one of psk / x509 */
  gnutls_certificate_credentials_t x509;
  bool verify_peer;
};

struct buf {
  uint8_t *data;
  size_t len, cap, pos;          /* pos: consumed prefix (input only) */
};

struct cbwd_tls {
  gnutls_session_t s;
  const struct cbwd_tls_creds *cr;
  struct buf in, out;
  bool out_failed;               /* push could not grow `out` */
  char *identity;
};

int
cbwd_tls_parse_mode (const char *s)
{
  if (strcmp (s, "off") == 0) return CBWD_TLS_OFF;
  if (strcmp (s, "on") == 0) return CBWD_TLS_ON;
  if (strcmp (s, "require") == 0) return CBWD_TLS_REQUIRE;
  return -1;
}

const char *
cbwd_tls_mode_name (int mode)
{
  switch (mode) {
  case CBWD_TLS_OFF: return "off";
  case CBWD_TLS_ON: return "on";
  case CBWD_TLS_REQUIRE: return "require";
  default: return "unset";
  }
}

static bool
readable_file (const char *path)
{
  struct stat st;
  return stat (path, &st) == 0 && S_ISREG (st.st_mode) && access (path, R_OK) == 0;
}

void
cbwd_tls_creds_free (struct cbwd_tls_creds *cr)
{
  if (!cr) return;
  if (cr->psk) gnutls_psk_free_server_credentials (cr->psk);
  if (cr->x509) gnutls_certificate_free_credentials (cr->x509);
  free (cr);
}

const char *
cbwd_tls_creds_kind (const struct cbwd_tls_creds *cr)
{
  return cr->psk ? "PSK" : "X.509";
}

static int
load_psk (struct cbwd_tls_creds *cr, const char *file, struct cbw_err *err)
{
  if (!readable_file (file))
    return cbw_err_set (err, errno ? errno : EINVAL,
                        "--tls-psk %s: not a readable file", file);
  /* Check the format here: GnuTLS reads the file only when a client
   * connects, and would then fail that client without saying why. */
  FILE *f = fopen (file, "r");
  if (!f)
    return cbw_err_set (err, errno, "--tls-psk %s: %s", file, strerror (errno));
  char line[4096];
  unsigned lineno = 0, nkeys = 0;
  int rc = 0;
  while (fgets (line, sizeof line, f)) {
    lineno++;
    size_t l = strcspn (line, "\r\n");
    line[l] = 0;
    if (l == 0) continue;
    char *colon = strchr (line, ':');
    const char *hex = colon ? colon + 1 : NULL;
    size_t hl = hex ? strlen (hex) : 0;
    if (!colon || colon == line || hl == 0 || hl % 2 != 0 ||
        strspn (hex, "0123456789abcdefABCDEF") != hl) {
      rc = cbw_err_set (err, EINVAL, "--tls-psk %s: line %u: expected username:hexkey",
                        file, lineno);
      break;
    }
    nkeys++;
  }
  fclose (f);
  if (rc == 0 && nkeys == 0)
    rc = cbw_err_set (err, EINVAL, "--tls-psk %s: no username:hexkey line", file);
  if (rc) return rc;
  int r = gnutls_psk_allocate_server_credentials (&cr->psk);
  if (r == 0) r = gnutls_psk_set_server_credentials_file (cr->psk, file);
  if (r == 0) r = gnutls_psk_set_server_known_dh_params (cr->psk, GNUTLS_SEC_PARAM_MEDIUM);
  if (r < 0)
    return cbw_err_set (err, EINVAL, "--tls-psk %s: %s", file, gnutls_strerror (r));
  return 0;
}

static int
load_x509 (struct cbwd_tls_creds *cr, const char *dir, bool verify_peer,
           struct cbw_err *err)
{
  char ca[4096], crl[4096], cert[4096], key[4096];
  snprintf (ca, sizeof ca, "%s/ca-cert.pem", dir);
  snprintf (crl, sizeof crl, "%s/ca-crl.pem", dir);
  snprintf (cert, sizeof cert, "%s/server-cert.pem", dir);
  snprintf (key, sizeof key, "%s/server-key.pem", dir);
  if (!readable_file (cert) || !readable_file (key))
    return cbw_err_set (err, ENOENT,
                        "--tls-certificates %s: needs readable server-cert.pem and server-key.pem",
                        dir);
  if (verify_peer && !readable_file (ca))
    return cbw_err_set (err, ENOENT,
                        "--tls-verify-peer: %s has no readable ca-cert.pem to verify clients with",
                        dir);
  int r = gnutls_certificate_allocate_credentials (&cr->x509);
  if (r < 0)
    return cbw_err_set (err, ENOMEM, "--tls-certificates: %s", gnutls_strerror (r));
  if (readable_file (ca) &&
      (r = gnutls_certificate_set_x509_trust_file (cr->x509, ca, GNUTLS_X509_FMT_PEM)) < 0)
    return cbw_err_set (err, EINVAL, "%s: %s", ca, gnutls_strerror (r));
  if (readable_file (crl) &&
      (r = gnutls_certificate_set_x509_crl_file (cr->x509, crl, GNUTLS_X509_FMT_PEM)) < 0)
    return cbw_err_set (err, EINVAL, "%s: %s", crl, gnutls_strerror (r));
  r = gnutls_certificate_set_x509_key_file (cr->x509, cert, key, GNUTLS_X509_FMT_PEM);
  if (r < 0)
    return cbw_err_set (err, EINVAL, "%s, %s: %s", cert, key, gnutls_strerror (r));
  gnutls_certificate_set_known_dh_params (cr->x509, GNUTLS_SEC_PARAM_MEDIUM);
  return 0;
}

struct cbwd_tls_creds *
cbwd_tls_creds_load (const struct cbwd_tls_config *cfg, struct cbw_err *err)
{
  if (!cfg->psk == !cfg->certificates) {
    cbw_err_set (err, EINVAL, cfg->psk ? "--tls-psk and --tls-certificates: give only one"
                                       : "TLS needs --tls-psk FILE or --tls-certificates DIR");
    return NULL;
  }
  if (cfg->verify_peer && !cfg->certificates) {
    cbw_err_set (err, EINVAL, "--tls-verify-peer needs --tls-certificates (PSK always authenticates the client)");
    return NULL;
  }
  struct cbwd_tls_creds *cr = calloc (1, sizeof *cr);
  if (!cr) { cbw_err_set (err, ENOMEM, "out of memory"); return NULL; }
  cr->verify_peer = cfg->verify_peer;
  errno = 0;
  int rc = cfg->psk ? load_psk (cr, cfg->psk, err)
                    : load_x509 (cr, cfg->certificates, cfg->verify_peer, err);
  if (rc) {
    cbwd_tls_creds_free (cr);
    return NULL;
  }
  return cr;
}

/* ---- transport over the two buffers ---- */

static int
buf_put (struct buf *b, const void *data, size_t len)
{
  if (b->cap - b->len < len) {
    size_t cap = b->cap ? b->cap : 4096;
    while (cap - b->len < len) cap *= 2;
    uint8_t *d = realloc (b->data, cap);
    if (!d) return -1;
    b->data = d;
    b->cap = cap;
  }
  memcpy (b->data + b->len, data, len);
  b->len += len;
  return 0;
}

static ssize_t
tls_push (gnutls_transport_ptr_t p, const void *data, size_t len)
{
  struct cbwd_tls *t = p;
  if (buf_put (&t->out, data, len) == -1) {
    t->out_failed = true;
    gnutls_transport_set_errno (t->s, ENOMEM);
    return -1;
  }
  return (ssize_t) len;
}

static ssize_t
tls_pull (gnutls_transport_ptr_t p, void *data, size_t len)
{
  struct cbwd_tls *t = p;
  size_t have = t->in.len - t->in.pos;
  if (have == 0) {
    gnutls_transport_set_errno (t->s, EAGAIN);
    return -1;
  }
  if (len > have) len = have;
  memcpy (data, t->in.data + t->in.pos, len);
  t->in.pos += len;
  if (t->in.pos == t->in.len)
    t->in.pos = t->in.len = 0;
  return (ssize_t) len;
}

static int
tls_pull_timeout (gnutls_transport_ptr_t p, unsigned ms)
{
  (void) ms;
  struct cbwd_tls *t = p;
  return t->in.len > t->in.pos ? 1 : 0;
}

struct cbwd_tls *
cbwd_tls_new (const struct cbwd_tls_creds *cr, struct cbw_err *err)
{
  struct cbwd_tls *t = calloc (1, sizeof *t);
  if (!t) { cbw_err_set (err, ENOMEM, "out of memory"); return NULL; }
  t->cr = cr;
  int r = gnutls_init (&t->s, GNUTLS_SERVER | GNUTLS_NONBLOCK);
  if (r < 0) {
    free (t);
    cbw_err_set (err, ENOMEM, "gnutls_init: %s", gnutls_strerror (r));
    return NULL;
  }
  const char *prio = cr->psk ? "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK" : "NORMAL";
  r = gnutls_priority_set_direct (t->s, prio, NULL);
  if (r == 0) {
    if (cr->psk)
      r = gnutls_credentials_set (t->s, GNUTLS_CRD_PSK, cr->psk);
    else {
      r = gnutls_credentials_set (t->s, GNUTLS_CRD_CERTIFICATE, cr->x509);
      if (cr->verify_peer) {
        /* The client must present a certificate that verifies against
         * ca-cert.pem, else the handshake fails. */
        gnutls_certificate_server_set_request (t->s, GNUTLS_CERT_REQUIRE);
        gnutls_session_set_verify_cert (t->s, NULL, 0);
      }
      else
        gnutls_certificate_server_set_request (t->s, GNUTLS_CERT_IGNORE);
    }
  }
  if (r < 0) {
    cbw_err_set (err, EINVAL, "TLS session set-up: %s", gnutls_strerror (r));
    cbwd_tls_free (t);
    return NULL;
  }
  gnutls_transport_set_ptr (t->s, t);
  gnutls_transport_set_push_function (t->s, tls_push);
  gnutls_transport_set_pull_function (t->s, tls_pull);
  gnutls_transport_set_pull_timeout_function (t->s, tls_pull_timeout);
  /* cbwd's --handshake-timeout timer bounds the handshake. */
  gnutls_handshake_set_timeout (t->s, 0);
  return t;
}

void
cbwd_tls_free (struct cbwd_tls *t)
{
  if (!t) return;
  gnutls_deinit (t->s);
  free (t->in.data);
  free (t->out.data);
  free (t->identity);
  free (t);
}

int
cbwd_tls_input (struct cbwd_tls *t, const void *buf, size_t len)
{
  return buf_put (&t->in, buf, len);
}

static void
record_identity (struct cbwd_tls *t)
{
  char *id = NULL;
  if (t->cr->psk) {
    const char *u = gnutls_psk_server_get_username (t->s);
    if (u && asprintf (&id, "psk:%s", u) == -1) id = NULL;
  }
  else {
    unsigned n = 0;
    const gnutls_datum_t *certs = gnutls_certificate_get_peers (t->s, &n);
    gnutls_x509_crt_t crt;
    if (certs && n > 0 && gnutls_x509_crt_init (&crt) == 0) {
      gnutls_datum_t dn = { NULL, 0 };
      if (gnutls_x509_crt_import (crt, &certs[0], GNUTLS_X509_FMT_DER) == 0 &&
          gnutls_x509_crt_get_dn3 (crt, &dn, 0) == 0) {
        if (asprintf (&id, "x509:%.*s", (int) dn.size, (const char *) dn.data) == -1)
          id = NULL;
        gnutls_free (dn.data);
      }
      gnutls_x509_crt_deinit (crt);
    }
  }
  t->identity = id;
}

int
cbwd_tls_handshake (struct cbwd_tls *t, struct cbw_err *err)
{
  for (unsigned round = 0;; round++) {
    int r = gnutls_handshake (t->s);
    if (r == GNUTLS_E_SUCCESS) {
      record_identity (t);
      return 1;
    }
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
      if (t->out_failed)
        return cbw_err_set (err, ENOMEM, "TLS handshake: out of memory");
      if (t->in.len > t->in.pos && round < 64)   /* progress is still possible */
        continue;
      return 0;
    }
    if (!gnutls_error_is_fatal (r) && round < 64)
      continue;                    /* warning alert: go on */
    /* Tell the peer why (an alert record in the output), like nbdkit. */
    gnutls_alert_send_appropriate (t->s, r);
    if (r == GNUTLS_E_CERTIFICATE_VERIFICATION_ERROR) {
      unsigned st = gnutls_session_get_verify_cert_status (t->s);
      gnutls_datum_t msg = { NULL, 0 };
      if (gnutls_certificate_verification_status_print (st, GNUTLS_CRT_X509, &msg, 0) == 0) {
        cbw_err_set (err, EACCES, "TLS handshake: client certificate: %s", msg.data);
        gnutls_free (msg.data);
        return -1;
      }
    }
    return cbw_err_set (err, r == GNUTLS_E_DECRYPTION_FAILED ? EACCES : EPROTO,
                        "TLS handshake: %s", gnutls_strerror (r));
  }
}

ssize_t
cbwd_tls_recv (struct cbwd_tls *t, void *buf, size_t len, struct cbw_err *err)
{
  for (unsigned round = 0;; round++) {
    ssize_t r = gnutls_record_recv (t->s, buf, len);
    if (r > 0) return r;
    if (r == 0) {
      cbw_err_set (err, EPIPE, "TLS: the client closed the session");
      err->errnum = 0;             /* a clean end, not an error */
      return -1;
    }
    if (r == GNUTLS_E_AGAIN || r == GNUTLS_E_INTERRUPTED) {
      if (t->out_failed) {
        cbw_err_set (err, ENOMEM, "TLS: out of memory");
        return -1;
      }
      /* GnuTLS also says EAGAIN after a record that carried no data
       * (a post-handshake message): go on while input is left, else the
       * caller would wait for bytes the peer already sent. */
      if (t->in.len > t->in.pos && round < 1024)
        continue;
      return 0;
    }
    if (r == GNUTLS_E_REHANDSHAKE) {
      cbw_err_set (err, EPROTO, "TLS: the client asked for renegotiation (refused)");
      return -1;
    }
    if (!gnutls_error_is_fatal ((int) r) && round < 64)
      continue;
    cbw_err_set (err, EPROTO, "TLS: %s", gnutls_strerror ((int) r));
    return -1;
  }
}

int
cbwd_tls_send (struct cbwd_tls *t, const void *buf, size_t len, struct cbw_err *err)
{
  const uint8_t *p = buf;
  /* Room for the records up front: one copy per byte, no regrowth. */
  size_t need = t->out.len + len + (len / 16384 + 1) * 64;
  if (need > t->out.cap) {
    uint8_t *d = realloc (t->out.data, need);
    if (!d) return cbw_err_set (err, ENOMEM, "TLS: out of memory");
    t->out.data = d;
    t->out.cap = need;
  }
  unsigned again = 0;
  while (len > 0) {
    ssize_t r = gnutls_record_send (t->s, p, len);
    if (r < 0) {
      if (t->out_failed)
        return cbw_err_set (err, ENOMEM, "TLS: out of memory");
      /* push never blocks, so a retry goes through; bounded all the same */
      if ((r == GNUTLS_E_INTERRUPTED || r == GNUTLS_E_AGAIN) && ++again < 16)
        continue;
      return cbw_err_set (err, EPROTO, "TLS: %s", gnutls_strerror ((int) r));
    }
    p += r;
    len -= (size_t) r;
  }
  return 0;
}

void
cbwd_tls_bye (struct cbwd_tls *t)
{
  /* The push function never blocks, so this does not return EAGAIN. */
  gnutls_bye (t->s, GNUTLS_SHUT_WR);
}

uint8_t *
cbwd_tls_take_output (struct cbwd_tls *t, size_t *len)
{
  uint8_t *d = t->out.data;
  *len = t->out.len;
  if (*len == 0) return NULL;
  t->out.data = NULL;
  t->out.len = t->out.cap = 0;
  return d;
}

const char *
cbwd_tls_identity (const struct cbwd_tls *t)
{
  return t->identity;
}

const char *
cbwd_tls_description (struct cbwd_tls *t, char *buf, size_t len)
{
  char *d = gnutls_session_get_desc (t->s);
  snprintf (buf, len, "%s", d ? d : "TLS");
  gnutls_free (d);
  return buf;
}
