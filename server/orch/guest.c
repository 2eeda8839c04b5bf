/* cbw — server/orch/guest.c: guest freeze/thaw around a point in time.
 *
 * Two ways, chosen per backup:
 *  - a named hook: a program configured in cbwd (--freeze-hook NAME=/PATH or
 *    the config file's "freeze-hooks"), selected by NAME from the control
 *    socket and run as `PATH freeze|thaw` with execv semantics (no shell:
 *    nothing a control client sends is ever interpreted as a command line),
 *    in its own process group, with a timeout: exit 0 is success; a non-zero
 *    exit or no answer in time is a failure (and the hook's process group is
 *    killed).  Output goes to STATE_DIR/hook.log.
 *  - the qemu-guest-agent protocol on a Unix socket (the host side of the
 *    agent's virtio-serial channel): a 0xFF byte to reset the agent's parser,
 *    `guest-sync` with a random id (replies up to the matching one are
 *    stale and skipped), then `guest-fsfreeze-freeze` or
 *    `guest-fsfreeze-thaw`; `{"return": N}` is success, `{"error": ...}` a
 *    failure with the agent's message.  One connection per phase; the whole
 *    exchange is bounded by the timeout (poll on every read and write).
 * A guest that does not answer never blocks the disks: the caller then fails
 * the backup or proceeds crash-consistent, as the user chose
 * (freeze.required).
 *
 * Locking: none (runs as the busy owner, no shared state).
 */
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <signal.h>
#include <stdlib.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cleanup.h"
#include "orch_internal.h"

#define QGA_LINE_MAX (64 * 1024)

static int64_t
mono_ms (void)
{
  return orch_now_ns () / 1000000;
}

/* Wait for fd to be ready for ev until deadline_ms; 0, or -1 + err. */
static int
qga_wait (int fd, short ev, int64_t deadline_ms, const char *what,
          struct cbw_err *err)
{
  for (;;) {
    int64_t left = deadline_ms - mono_ms ();
    if (left <= 0)
      return cbw_err_set (err, ETIMEDOUT, "guest agent: no answer to %s in "
                          "time", what);
    struct pollfd p = { .fd = fd, .events = ev };
    int r = poll (&p, 1, (int) left);
    if (r > 0)
      return 0;
    if (r < 0 && errno != EINTR)
      return cbw_err_set (err, errno, "guest agent: poll: %s", strerror (errno));
  }
}

static int
qga_send (int fd, const char *buf, size_t len, int64_t deadline_ms,
          const char *what, struct cbw_err *err)
{
  while (len > 0) {
    if (qga_wait (fd, POLLOUT, deadline_ms, what, err) < 0)
      return -1;
    ssize_t w = send (fd, buf, len, MSG_NOSIGNAL | MSG_DONTWAIT);
    if (w < 0) {
      if (errno == EINTR || errno == EAGAIN)
        continue;
      return cbw_err_set (err, errno, "guest agent: sending %s: %s", what,
                          strerror (errno));
    }
    buf += w;
    len -= (size_t) w;
  }
  return 0;
}

/* Read one JSON reply line (bytes of 0xFF, as sent after a sync-delimited,
 * are skipped).  Returns the parsed object or NULL + err. */
static struct json_object *
qga_recv (int fd, char *buf, size_t *have, int64_t deadline_ms,
          const char *what, struct cbw_err *err)
{
  for (;;) {
    char *nl = memchr (buf, '\n', *have);
    if (nl) {
      size_t n = (size_t) (nl - buf) + 1, i = 0;
      *nl = '\0';
      while (i < n && (unsigned char) buf[i] == 0xFF)
        i++;
      struct json_object *o = i < n - 1 ? json_tokener_parse (buf + i) : NULL;
      memmove (buf, buf + n, *have - n);
      *have -= n;
      if (o)
        return o;
      continue;                  /* blank or unparsable line: skip */
    }
    if (*have >= QGA_LINE_MAX)
      return cbw_err_set (err, EPROTO, "guest agent: reply to %s longer than "
                          "%d bytes", what, QGA_LINE_MAX), NULL;
    if (qga_wait (fd, POLLIN, deadline_ms, what, err) < 0)
      return NULL;
    ssize_t r = recv (fd, buf + *have, QGA_LINE_MAX - *have, MSG_DONTWAIT);
    if (r == 0)
      return cbw_err_set (err, ECONNRESET, "guest agent closed the connection "
                          "during %s", what), NULL;
    if (r < 0) {
      if (errno == EINTR || errno == EAGAIN)
        continue;
      return cbw_err_set (err, errno, "guest agent: reading the reply to %s: "
                          "%s", what, strerror (errno)), NULL;
    }
    *have += (size_t) r;
  }
}

int
orch_guest_agent (const char *socket_path, const char *phase, double timeout,
                  struct cbw_err *err)
{
  const char *cmd = strcmp (phase, "freeze") == 0 ? "guest-fsfreeze-freeze"
    : "guest-fsfreeze-thaw";
  int64_t deadline = mono_ms () + (int64_t) ((timeout > 0 ? timeout : 10) * 1000);
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  CLEANUP_CLOSE int fd = -1;
  CLEANUP_FREE char *buf = NULL;
  size_t have = 0;
  char line[160];

  if (strlen (socket_path) >= sizeof sun.sun_path)
    return cbw_err_set (err, ENAMETOOLONG, "guest agent socket path too long: "
                        "%s", socket_path);
  strcpy (sun.sun_path, socket_path);
  fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC | SOCK_NONBLOCK, 0);
  if (fd < 0)
    return cbw_err_set (err, errno, "guest agent: socket: %s", strerror (errno));
  if (connect (fd, (struct sockaddr *) &sun, sizeof sun) < 0 &&
      errno != EINPROGRESS)
    return cbw_err_set (err, errno, "guest agent %s: connect: %s", socket_path,
                        strerror (errno));
  buf = malloc (QGA_LINE_MAX + 1);
  if (buf == NULL)
    return cbw_err_set (err, ENOMEM, "out of memory");

  /* 1. resynchronise: 0xFF resets the agent's parser, then guest-sync */
  long long id = (long long) (mono_ms () ^ ((int64_t) getpid () << 20)) & 0x3fffffff;
  int n = snprintf (line, sizeof line,
                    "\xff{\"execute\":\"guest-sync\",\"arguments\":{\"id\":%lld}}\n",
                    id);
  if (qga_send (fd, line, (size_t) n, deadline, "guest-sync", err) < 0)
    return -1;
  for (;;) {
    struct json_object *o = qga_recv (fd, buf, &have, deadline, "guest-sync", err), *v;
    if (o == NULL)
      return -1;
    bool match = json_object_object_get_ex (o, "return", &v) &&
      json_object_is_type (v, json_type_int) && json_object_get_int64 (v) == id;
    json_object_put (o);
    if (match)
      break;                     /* older replies are stale: skip them */
  }

  /* 2. the command */
  n = snprintf (line, sizeof line, "{\"execute\":\"%s\"}\n", cmd);
  if (qga_send (fd, line, (size_t) n, deadline, cmd, err) < 0)
    return -1;
  struct json_object *o = qga_recv (fd, buf, &have, deadline, cmd, err), *v, *d;
  if (o == NULL)
    return -1;
  int ret = 0;
  if (json_object_object_get_ex (o, "return", &v))
    ret = 0;
  else if (json_object_object_get_ex (o, "error", &v)) {
    const char *desc = json_object_object_get_ex (v, "desc", &d)
      ? json_object_get_string (d) : json_object_to_json_string (v);
    ret = cbw_err_set (err, EIO, "guest agent: %s failed: %s", cmd, desc);
  }
  else
    ret = cbw_err_set (err, EPROTO, "guest agent: unexpected reply to %s: %.200s",
                       cmd, json_object_to_json_string (o));
  json_object_put (o);
  return ret;
}

const char *
orch_freeze_hook (const struct cbw_orch *o, const char *name)
{
  size_t nl = strlen (name);
  for (size_t i = 0; i < o->nfreeze_hooks; i++) {
    const char *h = o->freeze_hooks[i];
    if (strncmp (h, name, nl) == 0 && h[nl] == '=')
      return h + nl + 1;
  }
  return NULL;
}

int
orch_guest_run (const struct orch_freeze *f, const char *phase, struct cbw_err *err)
{
  if (f->qga && f->qga[0])
    return orch_guest_agent (f->qga, phase, f->timeout, err);
  if (f->hook == NULL || f->hook[0] == '\0')
    return 0;
  if (f->hook[0] != '/')         /* resolved by name: always absolute */
    return cbw_err_set (err, EINVAL, "freeze hook '%s' is not an absolute path", f->hook);
  char *argv[] = { (char *) f->hook, (char *) phase, NULL };
  pid_t pid = orch_spawn (argv, f->log ? f->log : "/dev/null", err);
  if (pid < 0)
    return -1;
  double timeout = f->timeout > 0 ? f->timeout : 10;
  struct timespec t0, t;
  clock_gettime (CLOCK_MONOTONIC, &t0);
  for (;;) {
    int status;
    pid_t r = waitpid (pid, &status, WNOHANG);
    if (r == pid) {
      if (WIFEXITED (status) && WEXITSTATUS (status) == 0)
        return 0;
      if (WIFEXITED (status))
        return cbw_err_set (err, EIO, "guest %s hook exited with status %d",
                            phase, WEXITSTATUS (status));
      return cbw_err_set (err, EIO, "guest %s hook killed by signal %d", phase,
                          WIFSIGNALED (status) ? WTERMSIG (status) : 0);
    }
    clock_gettime (CLOCK_MONOTONIC, &t);
    if ((double) (t.tv_sec - t0.tv_sec) + (t.tv_nsec - t0.tv_nsec) / 1e9 > timeout) {
      kill (-pid, SIGKILL);
      kill (pid, SIGKILL);
      waitpid (pid, NULL, 0);
      return cbw_err_set (err, ETIMEDOUT, "guest %s hook did not answer within %.1f s",
                          phase, timeout);
    }
    usleep (10000);
  }
}
