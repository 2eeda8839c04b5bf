/* cbw — server/orch/disk_tcp.c: a disk's TCP listener, for guests on other
 * hosts, with nbdkit's own TLS.
 *
 * A disk added with `listen` gets a second nbdkit, the TCP front:
 *   nbdkit -f -P DISKDIR/tcp.pid -i HOST -p PORT --tls=require
 *     --tls-psk=FILE | --tls-certificates=DIR [--tls-verify-peer]
 *     nbd socket=DISKDIR/nbd.sock
 * It forwards every request to the disk's own nbdkit on its Unix socket, so
 * each remote write goes through the cbw and dirtybitmap filters exactly
 * like a local one (one write path, one set of filters per disk).  The
 * nbd plugin's default (dynamic-export=false) connects to the default
 * export only: the cbw filter's PIT export is never reachable from TCP.
 * Why a front and not nbdkit on TCP itself (nbdkit 1.32 cannot listen on
 * a Unix socket and TCP at once): see docs/design/disk-tls.md.
 *
 * The front holds no state: it is started after the disk's nbdkit (a disk
 * start is all or nothing), stopped before it, started again when cbwd
 * adopts a disk whose front is gone, and may be restarted at any time
 * without touching the guest-facing disk.  Its pid is kept in the state
 * file; like the disk's, it is trusted only while /proc/PID/cmdline still
 * names the disk's socket (`socket=DISKDIR/nbd.sock`).
 *
 * Key material: the PSK file and the X.509 private key must not be
 * readable or writable by group or others (nbdkit itself does not check);
 * checked at every start, so a key whose mode was widened stops the disk
 * from starting rather than being served.  Nothing here ever reads or
 * shows a key: `disk-list` shows the files' paths.
 *
 * Locking: d->tcp's configuration never changes after disk-add; its `pid`
 * is written under o->lock by the busy owner (start, stop) and read under
 * o->lock.  Spawning and waiting happen unlocked.
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cleanup.h"
#include "orch_internal.h"

static const char *const tls_names[] = { "off", "on", "require" };

const char *
orch_disk_tcp_tls_name (int tls)
{
  return tls >= 0 && tls <= 2 ? tls_names[tls] : "?";
}

void
orch_disk_tcp_free (struct orch_disk_tcp *t)
{
  if (t == NULL)
    return;
  free (t->listen); free (t->host); free (t->port);
  free (t->psk); free (t->certificates);
  free (t);
}

/* HOST:PORT or [V6]:PORT into t->host, t->port. */
static int
split_listen (struct orch_disk_tcp *t, struct cbw_err *err)
{
  const char *s = t->listen, *colon;
  size_t hl;

  if (s[0] == '[') {
    const char *close = strchr (s, ']');
    if (close == NULL || close[1] != ':')
      goto bad;
    hl = (size_t) (close - s - 1);
    colon = close + 1;
    s++;
  }
  else {
    colon = strrchr (s, ':');
    if (colon == NULL || memchr (s, ':', (size_t) (colon - s)) != NULL)
      goto bad;
    hl = (size_t) (colon - s);
  }
  if (hl == 0 || hl > 255 || strspn (s, "abcdefghijklmnopqrstuvwxyz"
                                     "ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.-:")
      < hl)
    goto bad;
  char *end;
  errno = 0;
  long port = strtol (colon + 1, &end, 10);
  if (colon[1] < '0' || colon[1] > '9' || *end || errno || port < 1 ||
      port > 65535)
    goto bad;
  t->host = strndup (s, hl);
  t->port = strdup (colon + 1);
  if (!t->host || !t->port)
    return cbw_err_set (err, ENOMEM, "out of memory");
  return 0;
 bad:
  return cbw_err_set (err, EINVAL, "listen \"%.200s\": expected HOST:PORT or "
                      "[IPV6]:PORT (port 1..65535)", t->listen);
}

bool
orch_disk_tcp_loopback (const struct orch_disk_tcp *t)
{
  return strncmp (t->host, "127.", 4) == 0 || strcmp (t->host, "::1") == 0 ||
    strcmp (t->host, "localhost") == 0;
}

static int
get_str (struct json_object *j, const char *key, char **out,
         struct cbw_err *err)
{
  struct json_object *v;
  *out = NULL;
  if (!json_object_object_get_ex (j, key, &v) || v == NULL)
    return 0;
  if (!json_object_is_type (v, json_type_string) ||
      json_object_get_string_len (v) == 0 ||
      json_object_get_string_len (v) > 4000)
    return cbw_err_set (err, EINVAL, "%s: expected a non-empty string", key);
  if ((*out = strdup (json_object_get_string (v))) == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  return 0;
}

/* The TLS policy, as cbwd's own listeners have it: a TCP listener names
 * its TLS mode; on/require take exactly one kind of credentials; off takes
 * none.  Paths must be absolute (nbdkit runs with another cwd). */
static int
check_policy (struct orch_disk_tcp *t, bool tls_given, struct cbw_err *err)
{
  if (!tls_given)
    return cbw_err_set (err, EINVAL, "listen %s: a TCP disk listener needs "
                        "tls: \"require\" (with tls-psk or tls-certificates), "
                        "or \"off\" explicitly for plain NBD on a trusted "
                        "network", t->listen);
  if (t->tls == 0 && (t->psk || t->certificates || t->verify_peer))
    return cbw_err_set (err, EINVAL, "tls off with TLS credentials: give "
                        "tls \"require\", or drop the credentials");
  if (t->tls != 0 && !t->psk == !t->certificates)
    return cbw_err_set (err, EINVAL, "tls %s needs exactly one of tls-psk and "
                        "tls-certificates", tls_names[t->tls]);
  if (t->verify_peer && !t->certificates)
    return cbw_err_set (err, EINVAL, "tls-verify-peer needs tls-certificates "
                        "(X.509)");
  if ((t->psk && t->psk[0] != '/') ||
      (t->certificates && t->certificates[0] != '/'))
    return cbw_err_set (err, EINVAL, "tls-psk / tls-certificates: must be an "
                        "absolute path");
  return 0;
}

int
orch_disk_tcp_parse (struct json_object *j, bool with_pid,
                     struct orch_disk_tcp **out, struct cbw_err *err)
{
  struct orch_disk_tcp *t;
  struct json_object *v;
  char *tls = NULL;

  *out = NULL;
  t = calloc (1, sizeof *t);
  if (t == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");
  if (get_str (j, "listen", &t->listen, err) < 0 ||
      get_str (j, "tls", &tls, err) < 0 ||
      get_str (j, "tls-psk", &t->psk, err) < 0 ||
      get_str (j, "tls-certificates", &t->certificates, err) < 0)
    goto fail;
  if (json_object_object_get_ex (j, "tls-verify-peer", &v))
    t->verify_peer = json_object_get_boolean (v);
  if (t->listen == NULL) {
    if (tls || t->psk || t->certificates || t->verify_peer) {
      cbw_err_set (err, EINVAL, "tls, tls-psk, tls-certificates and "
                   "tls-verify-peer need listen (a TCP listener)");
      goto fail;
    }
    free (t);
    return 0;                   /* no TCP listener */
  }
  t->tls = -1;
  for (int i = 0; tls && i < 3; i++)
    if (strcmp (tls, tls_names[i]) == 0)
      t->tls = i;
  if (tls && t->tls < 0) {
    cbw_err_set (err, EINVAL, "tls \"%.40s\": expected off, on or require",
                 tls);
    goto fail;
  }
  if (split_listen (t, err) < 0 || check_policy (t, tls != NULL, err) < 0)
    goto fail;
  if (with_pid && json_object_object_get_ex (j, "pid", &v))
    t->pid = json_object_get_int64 (v);
  free (tls);
  *out = t;
  return 0;
 fail:
  free (tls);
  orch_disk_tcp_free (t);
  return -1;
}

struct json_object *
orch_disk_tcp_json (const struct orch_disk_tcp *t, bool with_pid)
{
  struct json_object *j = json_object_new_object ();
  json_object_object_add (j, "listen", json_object_new_string (t->listen));
  json_object_object_add (j, "tls", json_object_new_string (tls_names[t->tls]));
  if (t->psk)
    json_object_object_add (j, "tls-psk", json_object_new_string (t->psk));
  if (t->certificates)
    json_object_object_add (j, "tls-certificates",
                            json_object_new_string (t->certificates));
  if (t->verify_peer)
    json_object_object_add (j, "tls-verify-peer", json_object_new_boolean (true));
  if (with_pid)
    json_object_object_add (j, "pid", json_object_new_int64 (t->pid > 0 ? t->pid : 0));
  return j;
}

/* A key file: regular, and no access for group or others. */
static int
check_key_file (const char *path, const char *what, struct cbw_err *err)
{
  struct stat st;
  if (stat (path, &st) < 0)
    return cbw_err_set (err, errno, "%s %s: %s", what, path, strerror (errno));
  if (!S_ISREG (st.st_mode))
    return cbw_err_set (err, EINVAL, "%s %s: not a regular file", what, path);
  if (st.st_mode & (S_IRWXG | S_IRWXO))
    return cbw_err_set (err, EPERM, "%s %s: mode %03o lets other users read or "
                        "change the key; chmod 600 it", what, path,
                        (unsigned) (st.st_mode & 0777));
  return 0;
}

static int
check_credentials (const struct orch_disk_tcp *t, struct cbw_err *err)
{
  if (t->psk)
    return check_key_file (t->psk, "tls-psk", err);
  if (t->certificates == NULL)
    return 0;
  const char *need[] = { "server-cert.pem", "server-key.pem", "ca-cert.pem" };
  for (size_t i = 0; i < (t->verify_peer ? 3 : 2); i++) {
    CLEANUP_FREE char *p = orch_strdup_printf ("%s/%s", t->certificates, need[i]);
    if (p == NULL)
      return cbw_err_set (err, ENOMEM, "out of memory");
    if (i == 1) {
      if (check_key_file (p, "tls-certificates", err) < 0)
        return -1;
    }
    else if (access (p, R_OK) < 0)
      return cbw_err_set (err, errno, "tls-certificates: %s: %s", p,
                          strerror (errno));
  }
  return 0;
}

static double
now_s (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (double) ts.tv_sec + ts.tv_nsec / 1e9;
}

/* nbdkit writes its -P pidfile once it listens: wait for it, or for the
 * front to exit (its pidfd turns readable). */
static int
wait_listening (const char *pidfile, int pidfd, double timeout,
                struct cbw_err *err)
{
  double end = now_s () + timeout;
  for (;;) {
    struct stat st;
    if (stat (pidfile, &st) == 0 && st.st_size > 0)
      return 0;
    struct pollfd p = { .fd = pidfd, .events = POLLIN };
    if (poll (&p, 1, 20) > 0)
      return cbw_err_set (err, ECHILD, "it exited before listening");
    if (now_s () > end)
      return cbw_err_set (err, ETIMEDOUT, "not listening within %.0f s",
                          timeout);
  }
}

/* The front's argv after the command prefix; strings owned by args[]. */
static size_t
front_argv (const struct orch_disk_tcp *t, const char *pidfile,
            const char *nbd_sock, char **argv, char **owned)
{
  size_t n = 0, k = 0;
  argv[n++] = (char *) "-f";
  argv[n++] = (char *) "-P";
  argv[n++] = (char *) pidfile;
  argv[n++] = (char *) "-i";
  argv[n++] = t->host;
  argv[n++] = (char *) "-p";
  argv[n++] = t->port;
  if (t->tls > 0) {
    argv[n++] = owned[k++] = orch_strdup_printf ("--tls=%s", tls_names[t->tls]);
    argv[n++] = owned[k++] = t->psk
      ? orch_strdup_printf ("--tls-psk=%s", t->psk)
      : orch_strdup_printf ("--tls-certificates=%s", t->certificates);
    if (t->verify_peer)
      argv[n++] = (char *) "--tls-verify-peer";
  }
  argv[n++] = (char *) "nbd";
  argv[n++] = owned[k++] = orch_strdup_printf ("socket=%s", nbd_sock);
  argv[n] = NULL;
  return n;
}

bool
orch_disk_tcp_alive (struct cbw_orch *o, struct orch_disk *d)
{
  int64_t pid;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    pid = d->tcp ? d->tcp->pid : 0;
  }
  CLEANUP_FREE char *needle = orch_strdup_printf ("socket=%s", d->nbd_sock);
  return pid > 0 && needle && orch_pid_cmdline_has (pid, needle, true);
}

int
orch_disk_tcp_start (struct cbw_orch *o, struct orch_disk *d,
                     struct cbw_err *err)
{
  struct orch_disk_tcp *t = d->tcp;
  char *argv[80], *owned[3] = { NULL, NULL, NULL };
  size_t n = 0;
  int pidfd, r = -1;

  if (t == NULL || orch_disk_tcp_alive (o, d))
    return 0;
  if (check_credentials (t, err) < 0)
    return cbw_err_prefix (err, "disk %s", d->name);
  CLEANUP_FREE char *pidfile = orch_strdup_printf ("%s/tcp.pid", d->dir);
  CLEANUP_FREE char *log = orch_strdup_printf ("%s/tcp.log", d->dir);
  if (!pidfile || !log)
    return cbw_err_set (err, ENOMEM, "out of memory");
  unlink (pidfile);
  for (size_t i = 0; o->nbdkit_argv[i] && n < 60; i++)
    argv[n++] = o->nbdkit_argv[i];
  front_argv (t, pidfile, d->nbd_sock, argv + n, owned);
  if (!owned[0] || (t->tls > 0 && (!owned[1] || !owned[2]))) {
    cbw_err_set (err, ENOMEM, "out of memory");
    goto out;
  }
  pid_t pid = orch_spawn_detached (argv, log, &pidfd, err);
  if (pid < 0) {
    cbw_err_prefix (err, "disk %s: TCP listener", d->name);
    goto out;
  }
  if (wait_listening (pidfile, pidfd, o->start_timeout, err) < 0) {
    char msg[CBW_ERR_MSG_MAX], tail[300];
    memcpy (msg, err->msg, sizeof msg);
    orch_kill_wait (pid, pidfd);
    close (pidfd);
    orch_log_tail (log, tail, sizeof tail);
    cbw_err_set (err, err->errnum, "disk %s: TCP listener %s did not start: "
                 "%s%s%s", d->name, t->listen, msg,
                 tail[0] ? "; nbdkit said: " : "", tail);
    goto out;
  }
  close (pidfd);
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    t->pid = pid;
  }
  r = 0;
 out:
  for (size_t i = 0; i < 3; i++)
    free (owned[i]);
  return r;
}

void
orch_disk_tcp_stop (struct cbw_orch *o, struct orch_disk *d)
{
  int64_t pid;
  if (d->tcp == NULL)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&o->lock);
    pid = d->tcp->pid;
    d->tcp->pid = 0;
  }
  CLEANUP_FREE char *needle = orch_strdup_printf ("socket=%s", d->nbd_sock);
  if (pid > 0 && needle)
    orch_kill_wait_if ((pid_t) pid, needle, true);
}
