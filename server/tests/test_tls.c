/* cbw — server/tests/test_tls.c: Criterion tests of server/tls.c, cbwd's
 * memory-to-memory TLS layer, against a real GnuTLS client session wired to
 * it through memory: a PSK handshake completes in small steps and records
 * the identity; data goes both ways, also in records bigger than one TLS
 * record; a wrong key, an unknown user and garbage fail the handshake with
 * an alert for the peer; and the credential loader refuses what it must
 * (malformed PSK lines, missing files, PSK and X.509 together).  The config
 * file's TLS keys are checked here too.  Single-threaded.
 */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <gnutls/gnutls.h>

#include "config.h"
#include "nbd_session.h"
#include "server.h"
#include "tls.h"

static char dir[] = "/tmp/test_tls.XXXXXX";
static char psk_path[256];

static void
write_file (const char *path, const char *text)
{
  FILE *f = fopen (path, "w");
  cr_assert_not_null (f);
  fputs (text, f);
  fclose (f);
}

static void
setup (void)
{
  cr_assert_not_null (mkdtemp (dir));
  snprintf (psk_path, sizeof psk_path, "%s/keys.psk", dir);
  write_file (psk_path, "alice:00112233445566778899aabbccddeeff\n"
                        "bob:ffeeddccbbaa99887766554433221100\n");
}

static void
teardown (void)
{
  char cmd[512];
  snprintf (cmd, sizeof cmd, "rm -rf %s", dir);
  cr_assert_eq (system (cmd), 0);
}

TestSuite (tls, .init = setup, .fini = teardown);

/* ---- a GnuTLS client over two memory pipes ---- */
struct pipe { uint8_t buf[1 << 20]; size_t len, pos; };
static struct pipe to_client;

struct client {
  gnutls_session_t s;
  gnutls_psk_client_credentials_t cred;
};

static ssize_t
cli_push (gnutls_transport_ptr_t p, const void *d, size_t n)
{
  struct cbwd_tls *srv = p;
  cr_assert_eq (cbwd_tls_input (srv, d, n), 0);
  return (ssize_t) n;
}

static ssize_t
cli_pull (gnutls_transport_ptr_t p, void *d, size_t n)
{
  (void) p;
  size_t have = to_client.len - to_client.pos;
  if (have == 0) { errno = EAGAIN; return -1; }
  if (n > have) n = have;
  memcpy (d, to_client.buf + to_client.pos, n);
  to_client.pos += n;
  return (ssize_t) n;
}

static void
client_new (struct client *c, struct cbwd_tls *srv, const char *user, const char *hexkey)
{
  to_client.len = to_client.pos = 0;
  cr_assert_eq (gnutls_init (&c->s, GNUTLS_CLIENT | GNUTLS_NONBLOCK), 0);
  cr_assert_eq (gnutls_priority_set_direct (c->s, "NORMAL:+ECDHE-PSK:+DHE-PSK:+PSK", NULL), 0);
  cr_assert_eq (gnutls_psk_allocate_client_credentials (&c->cred), 0);
  gnutls_datum_t key = { (unsigned char *) hexkey, strlen (hexkey) };
  cr_assert_eq (gnutls_psk_set_client_credentials (c->cred, user, &key, GNUTLS_PSK_KEY_HEX), 0);
  cr_assert_eq (gnutls_credentials_set (c->s, GNUTLS_CRD_PSK, c->cred), 0);
  gnutls_transport_set_ptr (c->s, srv);
  gnutls_transport_set_push_function (c->s, cli_push);
  gnutls_transport_set_pull_function (c->s, cli_pull);
}

static void
client_free (struct client *c)
{
  gnutls_deinit (c->s);
  gnutls_psk_free_client_credentials (c->cred);
}

/* Move the server's output to the client's input pipe. */
static void
server_to_client (struct cbwd_tls *t)
{
  size_t n;
  uint8_t *d = cbwd_tls_take_output (t, &n);
  cr_assert_leq (to_client.len + n, sizeof to_client.buf);
  if (n) memcpy (to_client.buf + to_client.len, d, n);
  to_client.len += n;
  free (d);
}

/* Run both handshakes until the server finishes or fails.  Returns the
 * server's result (1 or -1). */
static int
handshake (struct client *c, struct cbwd_tls *t, struct cbw_err *err, int *steps)
{
  int srv = 0;
  *steps = 0;
  for (int i = 0; i < 50 && srv == 0; i++) {
    int r = gnutls_handshake (c->s);
    if (r < 0 && gnutls_error_is_fatal (r)) break;
    srv = cbwd_tls_handshake (t, err);
    server_to_client (t);
    (*steps)++;
  }
  if (srv == 1)      /* let the client read the server's last flight */
    for (int i = 0; i < 10 && gnutls_handshake (c->s) != 0; i++) ;
  return srv;
}

static struct cbwd_tls_creds *
psk_creds (void)
{
  struct cbwd_tls_config cfg = { .mode = CBWD_TLS_REQUIRE, .psk = psk_path };
  struct cbw_err err = { 0 };
  struct cbwd_tls_creds *cr = cbwd_tls_creds_load (&cfg, &err);
  cr_assert_not_null (cr, "%s", err.msg);
  cr_assert_str_eq (cbwd_tls_creds_kind (cr), "PSK");
  return cr;
}

Test (tls, psk_handshake_identity_and_data)
{
  struct cbwd_tls_creds *cr = psk_creds ();
  struct cbw_err err = { 0 };
  struct cbwd_tls *t = cbwd_tls_new (cr, &err);
  cr_assert_not_null (t);
  struct client c;
  client_new (&c, t, "bob", "ffeeddccbbaa99887766554433221100");
  int steps;
  cr_assert_eq (handshake (&c, t, &err, &steps), 1, "%s", err.msg);
  cr_assert_gt (steps, 1, "the handshake advances in steps, never blocking");
  cr_assert_str_eq (cbwd_tls_identity (t), "psk:bob");

  /* client -> server: 100 KiB, several TLS records */
  static uint8_t big[100000], got[100000];
  for (size_t i = 0; i < sizeof big; i++) big[i] = (uint8_t) (i * 7 + 3);
  size_t sent = 0;
  while (sent < sizeof big) {
    ssize_t r = gnutls_record_send (c.s, big + sent, sizeof big - sent);
    cr_assert_gt (r, 0);
    sent += (size_t) r;
  }
  size_t have = 0;
  ssize_t r;
  while (have < sizeof big && (r = cbwd_tls_recv (t, got + have, sizeof got - have, &err)) > 0)
    have += (size_t) r;
  uint8_t one;
  r = cbwd_tls_recv (t, &one, 1, &err);
  cr_assert_eq (r, 0, "needs more input (EAGAIN), not an error: %s", err.msg);
  cr_assert_eq (have, sizeof big, "server got %zu of %zu", have, sizeof big);
  cr_assert_eq (memcmp (big, got, sizeof big), 0);

  /* server -> client: one call, ciphertext taken in one piece */
  cr_assert_eq (cbwd_tls_send (t, big, sizeof big, &err), 0);
  server_to_client (t);
  have = 0;
  memset (got, 0, sizeof got);
  for (int i = 0; i < 1000 && have < sizeof big; i++) {
    r = gnutls_record_recv (c.s, got + have, sizeof got - have);
    if (r > 0) have += (size_t) r;
    else cr_assert (!gnutls_error_is_fatal ((int) r), "client: %s", gnutls_strerror ((int) r));
  }
  cr_assert_eq (have, sizeof big, "got %zu, last %zd (%s)", have, r, gnutls_strerror ((int) r));
  cr_assert_eq (memcmp (big, got, sizeof big), 0);

  /* close_notify from the server, then from the client: end of stream */
  cbwd_tls_bye (t);
  server_to_client (t);
  cr_assert_eq (gnutls_record_recv (c.s, got, 1), 0);
  cr_assert_eq (gnutls_bye (c.s, GNUTLS_SHUT_WR), 0);
  err.errnum = -1;
  cr_assert_eq (cbwd_tls_recv (t, got, 1, &err), -1);
  cr_assert_eq (err.errnum, 0, "peer's close_notify is a clean end");
  client_free (&c);
  cbwd_tls_free (t);
  cbwd_tls_creds_free (cr);
}

static void
expect_refused (const char *user, const char *key)
{
  struct cbwd_tls_creds *cr = psk_creds ();
  struct cbw_err err = { 0 };
  struct cbwd_tls *t = cbwd_tls_new (cr, &err);
  struct client c;
  client_new (&c, t, user, key);
  int steps;
  cr_assert_eq (handshake (&c, t, &err, &steps), -1, "%s/%s was accepted", user, key);
  cr_assert_neq (err.errnum, 0);
  cr_assert_null (cbwd_tls_identity (t));
  /* The client is told: the last thing it reads is an alert. */
  int r;
  for (int i = 0; i < 10 && (r = gnutls_handshake (c.s)) == GNUTLS_E_AGAIN; i++) ;
  cr_assert_lt (r, 0);
  cr_assert (gnutls_error_is_fatal (r));
  client_free (&c);
  cbwd_tls_free (t);
  cbwd_tls_creds_free (cr);
}

Test (tls, wrong_key_refused) { expect_refused ("alice", "00112233445566778899aabbccddeef0"); }
Test (tls, unknown_user_refused) { expect_refused ("mallory", "00112233445566778899aabbccddeeff"); }

Test (tls, garbage_fails_the_handshake)
{
  struct cbwd_tls_creds *cr = psk_creds ();
  struct cbw_err err = { 0 };
  struct cbwd_tls *t = cbwd_tls_new (cr, &err);
  static const char junk[] = "NBD is not TLS\r\nNBD is not TLS\r\n";
  cr_assert_eq (cbwd_tls_input (t, junk, sizeof junk - 1), 0);
  cr_assert_eq (cbwd_tls_handshake (t, &err), -1);
  cr_assert_neq (err.errnum, 0);
  /* nothing yet: needs more input, no error */
  struct cbwd_tls *t2 = cbwd_tls_new (cr, &err);
  cr_assert_eq (cbwd_tls_handshake (t2, &err), 0);
  cbwd_tls_free (t2);
  cbwd_tls_free (t);
  cbwd_tls_creds_free (cr);
}

static void
expect_load_error (struct cbwd_tls_config *cfg, const char *msg)
{
  struct cbw_err err = { 0 };
  struct cbwd_tls_creds *cr = cbwd_tls_creds_load (cfg, &err);
  cr_assert_null (cr, "loaded, expected: %s", msg);
  cr_assert (strstr (err.msg, msg), "expected \"%s\" in \"%s\"", msg, err.msg);
}

Test (tls, credentials_refused)
{
  char p[300];
  struct cbwd_tls_config cfg = { .mode = CBWD_TLS_REQUIRE };
  expect_load_error (&cfg, "needs --tls-psk FILE or --tls-certificates DIR");
  cfg.psk = psk_path; cfg.certificates = dir;
  expect_load_error (&cfg, "give only one");
  cfg.certificates = NULL; cfg.verify_peer = true;
  expect_load_error (&cfg, "--tls-verify-peer needs --tls-certificates");
  cfg.verify_peer = false;
  snprintf (p, sizeof p, "%s/bad.psk", dir);
  write_file (p, "alice:00112233\nbob 0011\n");
  cfg.psk = p;
  expect_load_error (&cfg, "line 2: expected username:hexkey");
  write_file (p, "alice:0011xx\n");
  expect_load_error (&cfg, "line 1: expected username:hexkey");
  write_file (p, "\n");
  expect_load_error (&cfg, "no username:hexkey line");
  snprintf (p, sizeof p, "%s/missing.psk", dir);
  expect_load_error (&cfg, "not a readable file");
  cfg.psk = NULL; cfg.certificates = dir;
  expect_load_error (&cfg, "needs readable server-cert.pem and server-key.pem");
}

Test (tls, modes)
{
  cr_assert_eq (cbwd_tls_parse_mode ("off"), CBWD_TLS_OFF);
  cr_assert_eq (cbwd_tls_parse_mode ("on"), CBWD_TLS_ON);
  cr_assert_eq (cbwd_tls_parse_mode ("require"), CBWD_TLS_REQUIRE);
  cr_assert_eq (cbwd_tls_parse_mode ("yes"), -1);
  cr_assert_str_eq (cbwd_tls_mode_name (CBWD_TLS_REQUIRE), "require");
}

Test (tls, config_file_keys)
{
  char cfgp[300];
  snprintf (cfgp, sizeof cfgp, "%s/cbwd.json", dir);
  struct cbwd_server srv;
  memset (&srv, 0, sizeof srv);
  srv.tls.mode = -1;
  struct cbw_err err = { 0 };
  write_file (cfgp, "{ \"tls\": \"require\", \"tls-psk\": \"keys.psk\", \"tls-verify-peer\": false }");
  cr_assert_eq (cbwd_load_config (cfgp, &srv, &err), 0, "%s", err.msg);
  cr_assert_eq (srv.tls.mode, CBWD_TLS_REQUIRE);
  cr_assert_str_eq (srv.tls.psk, psk_path, "relative to the config file's directory");
  free (srv.tls.psk);
  /* the command line wins */
  memset (&srv, 0, sizeof srv);
  srv.tls.mode = CBWD_TLS_OFF;
  srv.tls.psk = strdup ("/cmdline.psk");
  cr_assert_eq (cbwd_load_config (cfgp, &srv, &err), 0, "%s", err.msg);
  cr_assert_eq (srv.tls.mode, CBWD_TLS_OFF);
  cr_assert_str_eq (srv.tls.psk, "/cmdline.psk");
  free (srv.tls.psk);
  write_file (cfgp, "{ \"tls\": \"maybe\" }");
  memset (&srv, 0, sizeof srv);
  srv.tls.mode = -1;
  cr_assert_eq (cbwd_load_config (cfgp, &srv, &err), -1);
  cr_assert (strstr (err.msg, "\"tls\" must be"), "%s", err.msg);
  write_file (cfgp, "{ \"tls-verify-peer\": \"yes\" }");
  cr_assert_eq (cbwd_load_config (cfgp, &srv, &err), -1);
  cr_assert (strstr (err.msg, "true or false"), "%s", err.msg);
}
