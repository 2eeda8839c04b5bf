/* cbw — common/control_client.c: the client side of the control socket (see
 * control.h): connect and check the greeting, send a request with a fresh
 * numeric "id", read lines until the reply carrying that id arrives.  On a
 * subscribed connection the event lines read meanwhile are kept (at most
 * CLIENT_MAX_PENDING_EVENTS) for cbw_ctl_client_read_event(), which returns
 * them first, then reads more.
 *
 * Locking: none.  A struct cbw_ctl_client is one connection used by one
 * thread at a time; callers that share one serialise calls themselves.
 * Sends use MSG_NOSIGNAL so a server that went away yields EPIPE, never
 * SIGPIPE.
 */
#include <errno.h>
#include <poll.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <time.h>
#include <unistd.h>

#include <json-c/json.h>

#include "cbw_err.h"
#include "cleanup.h"
#include "control.h"

/* Error text without locale or gettext: strerror() takes glibc's locale
 * lock, which is unusable in nbdkit under a preloaded ASan runtime, and is
 * not guaranteed thread-safe. */
static inline const char *
errstr (int e)
{
  const char *s = strerrordesc_np (e);
  return s ? s : "Unknown error";
}

/* Replies can be large (query-commands); refuse anything absurd. */
#define CLIENT_MAX_REPLY (64 * 1024 * 1024)
#define GREETING_TIMEOUT_MS 10000

/* Event lines that arrived while a call waited for its reply. */
#define CLIENT_MAX_PENDING_EVENTS 4096
struct pending_event {
  struct pending_event *next;
  char *line;
};

struct cbw_ctl_client {
  int fd;
  struct pending_event *ev_head, *ev_tail;
  size_t nev;
  char *buf;                     /* received, not yet consumed */
  size_t len, alloc;
  char module[64];
  int64_t next_id;
  int timeout_ms;                /* 0 = forever */
  bool broken;                   /* a call timed out or failed mid-way */
};

static int64_t
now_ms (void)
{
  struct timespec ts;
  clock_gettime (CLOCK_MONOTONIC, &ts);
  return (int64_t) ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Read one line with an overall timeout (0 = none). */
static char *
read_line_timeout (struct cbw_ctl_client *c, int timeout_ms,
                   struct cbw_err *err)
{
  int64_t deadline = timeout_ms > 0 ? now_ms () + timeout_ms : 0;
  size_t scanned = 0;

  for (;;) {
    char *nl = c->len > scanned ? memchr (c->buf + scanned, '\n',
                                          c->len - scanned) : NULL;
    if (nl) {
      size_t n = (size_t) (nl - c->buf);
      char *line = malloc (n + 1);
      if (line == NULL) {
        cbw_err_set (err, ENOMEM, "control client: out of memory");
        return NULL;
      }
      memcpy (line, c->buf, n);
      line[n] = '\0';
      memmove (c->buf, nl + 1, c->len - n - 1);
      c->len -= n + 1;
      return line;
    }
    scanned = c->len;
    if (c->len >= CLIENT_MAX_REPLY) {
      c->broken = true;
      cbw_err_set (err, EPROTO, "control client: reply line longer than %d "
                   "bytes", CLIENT_MAX_REPLY);
      return NULL;
    }
    if (c->alloc - c->len < 4096) {
      size_t na = c->alloc ? c->alloc * 2 : 8192;
      char *p = realloc (c->buf, na);
      if (p == NULL) {
        cbw_err_set (err, ENOMEM, "control client: out of memory");
        return NULL;
      }
      c->buf = p;
      c->alloc = na;
    }
    if (deadline) {
      int64_t left = deadline - now_ms ();
      struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
      int r;
      if (left <= 0) {
        c->broken = true;
        cbw_err_set (err, ETIMEDOUT, "control client: no reply within %d ms",
                     timeout_ms);
        return NULL;
      }
      r = poll (&pfd, 1, (int) left);
      if (r < 0 && errno != EINTR) {
        cbw_err_set (err, errno, "control client: poll: %s", errstr (errno));
        return NULL;
      }
      if (r <= 0)
        continue;
    }
    ssize_t r = recv (c->fd, c->buf + c->len, c->alloc - c->len, 0);
    if (r < 0) {
      if (errno == EINTR) continue;
      c->broken = true;
      cbw_err_set (err, errno, "control client: recv: %s", errstr (errno));
      return NULL;
    }
    if (r == 0) {
      c->broken = true;
      cbw_err_set (err, ECONNRESET,
                   "control client: server closed the connection");
      return NULL;
    }
    c->len += (size_t) r;
  }
}

char *
cbw_ctl_client_read_line (struct cbw_ctl_client *c, struct cbw_err *err)
{
  return read_line_timeout (c, c->timeout_ms, err);
}

int
cbw_ctl_client_send_raw (struct cbw_ctl_client *c, const void *buf,
                         size_t len, struct cbw_err *err)
{
  const char *p = buf;

  while (len > 0) {
    ssize_t r = send (c->fd, p, len, MSG_NOSIGNAL);
    if (r < 0) {
      if (errno == EINTR) continue;
      c->broken = true;
      return cbw_err_set (err, errno, "control client: send: %s",
                          errstr (errno));
    }
    p += r;
    len -= (size_t) r;
  }
  return 0;
}

struct cbw_ctl_client *
cbw_ctl_client_connect (const char *path, struct cbw_err *err)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  struct cbw_ctl_client *c;
  struct json_object *g = NULL, *cbw, *mod, *e;
  CLEANUP_FREE char *line = NULL;

  if (path == NULL || strlen (path) >= sizeof sun.sun_path) {
    cbw_err_set (err, ENAMETOOLONG, "control socket %s: path too long "
                 "(limit %zu bytes)", path ? path : "(null)",
                 sizeof sun.sun_path - 1);
    return NULL;
  }
  memcpy (sun.sun_path, path, strlen (path) + 1);
  c = calloc (1, sizeof *c);
  if (c == NULL) {
    cbw_err_set (err, ENOMEM, "control client: out of memory");
    return NULL;
  }
  c->next_id = 1;
  c->fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (c->fd < 0) {
    cbw_err_set (err, errno, "control socket %s: socket: %s", path,
                 errstr (errno));
    goto fail;
  }
  if (connect (c->fd, (struct sockaddr *) &sun, sizeof sun) == -1) {
    cbw_err_set (err, errno, "control socket %s: connect: %s", path,
                 errstr (errno));
    goto fail;
  }
  line = read_line_timeout (c, GREETING_TIMEOUT_MS, err);
  if (line == NULL) {
    cbw_err_prefix (err, "control socket %s: reading greeting", path);
    goto fail;
  }
  g = json_tokener_parse (line);
  if (g && json_object_object_get_ex (g, "error", &e)) {
    struct json_object *d = NULL;
    json_object_object_get_ex (e, "desc", &d);
    cbw_err_set (err, EBUSY, "control socket %s: server refused the "
                 "connection: %s", path,
                 d ? json_object_get_string (d) : "(no reason)");
    goto fail;
  }
  if (g == NULL || !json_object_object_get_ex (g, "cbw", &cbw) ||
      !json_object_object_get_ex (cbw, "module", &mod) ||
      !json_object_is_type (mod, json_type_string)) {
    cbw_err_set (err, EPROTO, "control socket %s: not a cbw control socket "
                 "(bad greeting)", path);
    goto fail;
  }
  snprintf (c->module, sizeof c->module, "%s", json_object_get_string (mod));
  json_object_put (g);
  return c;

 fail:
  json_object_put (g);
  cbw_ctl_client_close (c);
  return NULL;
}

const char *
cbw_ctl_client_module (const struct cbw_ctl_client *c)
{
  return c->module;
}

void
cbw_ctl_client_set_timeout (struct cbw_ctl_client *c, int timeout_ms)
{
  c->timeout_ms = timeout_ms > 0 ? timeout_ms : 0;
}

struct json_object *
cbw_ctl_client_call (struct cbw_ctl_client *c, const char *command,
                     struct json_object *args, struct cbw_err *err)
{
  struct json_object *req, *reply = NULL;
  int64_t id;
  char *s;
  size_t n;

  if (c->broken) {
    json_object_put (args);
    cbw_err_set (err, EPIPE, "control client: connection unusable after an "
                 "earlier failure");
    return NULL;
  }
  req = json_object_new_object ();
  if (req == NULL) {
    json_object_put (args);
    cbw_err_set (err, ENOMEM, "control client: out of memory");
    return NULL;
  }
  id = c->next_id++;
  json_object_object_add (req, "execute", json_object_new_string (command));
  if (args)
    json_object_object_add (req, "arguments", args);
  json_object_object_add (req, "id", json_object_new_int64 (id));
  s = strdup (json_object_to_json_string_ext (req, JSON_C_TO_STRING_PLAIN));
  json_object_put (req);
  if (s == NULL) {
    cbw_err_set (err, ENOMEM, "control client: out of memory");
    return NULL;
  }
  n = strlen (s);
  s[n] = '\n';                   /* replace NUL: send exactly n+1 bytes */
  int r = cbw_ctl_client_send_raw (c, s, n + 1, err);
  free (s);
  if (r == -1)
    return NULL;

  for (;;) {
    struct json_object *rid;
    CLEANUP_FREE char *line = cbw_ctl_client_read_line (c, err);

    if (line == NULL)
      return NULL;
    reply = json_tokener_parse (line);
    if (reply == NULL || !json_object_is_type (reply, json_type_object)) {
      json_object_put (reply);
      c->broken = true;
      cbw_err_set (err, EPROTO, "control client: unparsable reply: %.100s",
                   line);
      return NULL;
    }
    /* A reply without our id that is an error is about the request (e.g.
     * it could not be parsed, so no id was found): return it. */
    if ((json_object_object_get_ex (reply, "id", &rid) &&
         json_object_is_type (rid, json_type_int) &&
         json_object_get_int64 (rid) == id) ||
        (!json_object_object_get_ex (reply, "id", NULL) &&
         json_object_object_get_ex (reply, "error", NULL)))
      return reply;
    /* An event (subscribed connection): keep it for
     * cbw_ctl_client_read_event(); a stale reply: skip. */
    if (json_object_object_get_ex (reply, "event", NULL) &&
        c->nev < CLIENT_MAX_PENDING_EVENTS) {
      struct pending_event *pe = malloc (sizeof *pe);
      if (pe) {
        pe->next = NULL;
        pe->line = line;
        line = NULL;
        if (c->ev_tail)
          c->ev_tail->next = pe;
        else
          c->ev_head = pe;
        c->ev_tail = pe;
        c->nev++;
      }
    }
    json_object_put (reply);
  }
}

char *
cbw_ctl_client_read_event (struct cbw_ctl_client *c, int timeout_ms,
                           struct cbw_err *err)
{
  int64_t deadline = timeout_ms >= 0 ? now_ms () + timeout_ms : 0;

  if (c->ev_head) {
    struct pending_event *pe = c->ev_head;
    char *line = pe->line;
    c->ev_head = pe->next;
    if (c->ev_head == NULL)
      c->ev_tail = NULL;
    c->nev--;
    free (pe);
    return line;
  }
  for (;;) {
    struct json_object *o;
    char *line;
    /* Wait for data ourselves so a timeout leaves the connection usable
     * (read_line_timeout marks it broken). */
    if (c->len == 0 || memchr (c->buf, '\n', c->len) == NULL) {
      struct pollfd pfd = { .fd = c->fd, .events = POLLIN };
      int left = -1, r;
      if (timeout_ms >= 0) {
        int64_t l = deadline - now_ms ();
        left = l > 0 ? (int) l : 0;
      }
      r = poll (&pfd, 1, left);
      if (r < 0 && errno == EINTR)
        continue;
      if (r < 0) {
        cbw_err_set (err, errno, "control client: poll: %s", errstr (errno));
        return NULL;
      }
      if (r == 0) {
        cbw_err_set (err, ETIMEDOUT, "control client: no event within %d ms",
                     timeout_ms);
        return NULL;
      }
    }
    line = read_line_timeout (c, 0, err);
    if (line == NULL)
      return NULL;
    o = json_tokener_parse (line);
    if (o && json_object_is_type (o, json_type_object) &&
        json_object_object_get_ex (o, "event", NULL)) {
      json_object_put (o);
      return line;
    }
    json_object_put (o);         /* a stale reply: skip */
    free (line);
  }
}

static int
class_errno (int cls)
{
  switch (cls) {
  case CBW_CTL_NOT_FOUND: return ENOENT;
  case CBW_CTL_EXISTS: return EEXIST;
  case CBW_CTL_BUSY: return EBUSY;
  case CBW_CTL_INVALID_PARAMETER:
  case CBW_CTL_PARSE_ERROR: return EINVAL;
  case CBW_CTL_COMMAND_NOT_FOUND: return ENOTSUP;
  case CBW_CTL_TIMEOUT: return ETIMEDOUT;
  case CBW_CTL_PERMISSION_DENIED: return EACCES;
  default: return EIO;
  }
}

int
cbw_ctl_client_execute (struct cbw_ctl_client *c, const char *command,
                        struct json_object *args,
                        struct json_object **ret_out, int *err_class,
                        struct cbw_err *err)
{
  struct json_object *reply, *v, *cls, *desc;
  int ci;

  if (ret_out) *ret_out = NULL;
  if (err_class) *err_class = -1;
  reply = cbw_ctl_client_call (c, command, args, err);
  if (reply == NULL)
    return -1;
  if (json_object_object_get_ex (reply, "return", &v)) {
    if (ret_out)
      *ret_out = json_object_get (v);
    json_object_put (reply);
    return 0;
  }
  if (!json_object_object_get_ex (reply, "error", &v) ||
      !json_object_object_get_ex (v, "class", &cls) ||
      !json_object_object_get_ex (v, "desc", &desc)) {
    json_object_put (reply);
    return cbw_err_set (err, EPROTO, "%s: malformed reply", command);
  }
  ci = cbw_ctl_error_class_from_name (json_object_get_string (cls));
  if (err_class)
    *err_class = ci >= 0 ? ci : CBW_CTL_GENERIC_ERROR;
  cbw_err_set (err, class_errno (ci), "%s: %s: %s", command,
               json_object_get_string (cls), json_object_get_string (desc));
  json_object_put (reply);
  return -1;
}

void
cbw_ctl_client_close (struct cbw_ctl_client *c)
{
  if (c == NULL)
    return;
  if (c->fd >= 0)
    close (c->fd);
  while (c->ev_head) {
    struct pending_event *pe = c->ev_head;
    c->ev_head = pe->next;
    free (pe->line);
    free (pe);
  }
  free (c->buf);
  free (c);
}
