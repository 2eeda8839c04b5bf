/* cbw — common/control_server.c: the control socket itself.  Binds the Unix
 * socket (mode 0600, stale sockets replaced, live ones refused), checks
 * every peer, and runs the poll-based thread that reads request lines,
 * hands them to the dispatcher one at a time and sends the replies (and the
 * events of control_events.c).
 *
 * Access: the socket file is made 0600 (0660 with a control group) between
 * bind and listen, whatever the umask, and every accepted peer is checked
 * with SO_PEERCRED (root, the server's euid, or with a control group a
 * process whose gid or supplementary groups (SO_PEERGROUPS) include it):
 * cbwd's commands start backups and freeze guests, so a control socket is
 * as powerful as the server's user for whoever reaches it.
 *
 * Threads and locking: a server owns one thread; the clients are touched
 * only by it (see control_internal.h for the fields `qlock` guards).
 * Handlers run on it and take their module's own locks, never across I/O.
 * All sockets are non-blocking and every send uses MSG_NOSIGNAL, so a
 * client that stops reading or disappears can never block or kill the
 * process, nor block a broadcaster.
 */
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "cbw_err.h"
#include "cleanup.h"
#include "control_internal.h"

#ifndef CBW_VERSION
#define CBW_VERSION "0.0.0"
#endif

#define READ_CHUNK 65536

void
cbw_ctl__server_log (struct cbw_ctl_server *srv, const char *fmt, ...)
{
  char msg[512];
  va_list ap;

  va_start (ap, fmt);
  vsnprintf (msg, sizeof msg, fmt, ap);
  va_end (ap);
  if (srv->events && srv->events->log)
    srv->events->log (srv->module_data, msg);
  else
    fprintf (stderr, "cbw control (%s): %s\n", srv->table->module, msg);
}

void
cbw_ctl__client_unsubscribe (struct cbw_ctl_server *srv, struct client *c)
{
  if (!c->subscribed)
    return;
  c->subscribed = false;
  ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
  srv->nsubscribers--;
}

void
cbw_ctl__client_close (struct cbw_ctl_server *srv, struct client *c)
{
  cbw_ctl__client_unsubscribe (srv, c);
  if (c->fd >= 0)
    close (c->fd);
  free (c->in);
  free (c->out);
  memset (c, 0, sizeof *c);
  c->fd = -1;
}

/* Append bytes (a reply or event line) to a client's output. */
int
cbw_ctl__client_queue (struct client *c, const char *s, size_t len)
{
  if (c->out_off == c->out_len) {
    c->out_off = c->out_len = 0;
  }
  else if (c->out_off > 0) {     /* a subscriber may never fully drain */
    memmove (c->out, c->out + c->out_off, c->out_len - c->out_off);
    c->out_len -= c->out_off;
    c->out_off = 0;
  }
  char *p = realloc (c->out, c->out_len + len + 1);
  if (p == NULL)
    return -1;
  c->out = p;
  memcpy (c->out + c->out_len, s, len);
  c->out_len += len;
  c->out[c->out_len++] = '\n';
  return 0;
}

/* Send as much as the socket takes.  Returns -1 if the client is gone. */
int
cbw_ctl__client_flush (struct client *c)
{
  while (c->out_off < c->out_len) {
    ssize_t r = send (c->fd, c->out + c->out_off, c->out_len - c->out_off,
                      MSG_NOSIGNAL | MSG_DONTWAIT);
    if (r < 0) {
      if (errno == EINTR) continue;
      if (errno == EAGAIN || errno == EWOULDBLOCK) return 0;
      return -1;
    }
    c->out_off += (size_t) r;
  }
  return 0;
}

static bool
client_has_output (const struct client *c)
{
  return c->out_off < c->out_len;
}

/* Dispatch complete lines, one at a time, while nothing is waiting to be
 * sent (so a client that does not read its replies cannot make us buffer
 * without bound).  Returns -1 if the client must be dropped now. */
static int
client_process (struct cbw_ctl_server *srv, struct client *c)
{
  for (;;) {
    char *nl;
    size_t line_len;

    if (cbw_ctl__client_flush (c) == -1)
      return -1;
    if (c->closing || client_has_output (c))
      break;
    nl = c->in_len > c->scanned
      ? memchr (c->in + c->scanned, '\n', c->in_len - c->scanned) : NULL;

    if (nl == NULL) {
      c->scanned = c->in_len;
      if (c->in_len > CBW_CTL_MAX_LINE) {
        char msg[256];
        snprintf (msg, sizeof msg,
                  "{\"error\":{\"class\":\"%s\",\"desc\":\"request line too "
                  "long (more than %d bytes without a newline); closing the "
                  "connection\"}}",
                  cbw_ctl_error_class_name (CBW_CTL_PARSE_ERROR),
                  CBW_CTL_MAX_LINE);
        if (cbw_ctl__client_queue (c, msg, strlen (msg)) == -1)
          return -1;
        c->closing = true;
        continue;                /* flush it at the top of the loop */
      }
      break;
    }
    line_len = (size_t) (nl - c->in);
    if (line_len > 0 && c->in[line_len - 1] == '\r')
      line_len--;
    if (line_len > CBW_CTL_MAX_LINE || !cbw_ctl__all_space (c->in, line_len)) {
      struct builtin_ctx bctx = { .table = srv->table,
                                  .module_data = srv->module_data,
                                  .srv = srv, .client = c };
      char *reply = cbw_ctl__dispatch (&bctx, c->in, line_len);
      int r = reply ? cbw_ctl__client_queue (c, reply, strlen (reply)) : -1;
      free (reply);
      /* "subscribe" with since: the replayed events follow its reply */
      for (size_t i = 0; i < bctx.nreplay; i++) {
        if (r == 0)
          r = cbw_ctl__client_queue (c, bctx.replay[i],
                                     strlen (bctx.replay[i]));
        free (bctx.replay[i]);
      }
      free (bctx.replay);
      if (r == -1)
        return -1;
      if (line_len > CBW_CTL_MAX_LINE)
        c->closing = true;
    }
    /* Blank lines are ignored (handy for interactive use). */
    line_len = (size_t) (nl - c->in) + 1;
    memmove (c->in, c->in + line_len, c->in_len - line_len);
    c->in_len -= line_len;
    c->scanned = 0;
  }
  /* Every break above comes right after a flush with nothing queued since.
   * Do not flush again here: if that drained the output we would go back to
   * poll for POLLIN with complete lines still buffered, and a client that
   * has sent everything would wait for ever (seen as a rare hang of
   * socket::pipelined_requests_in_order). */
  if ((c->closing || (c->eof && !c->subscribed)) && !client_has_output (c))
    return -1;
  return 0;
}

static int
client_read (struct cbw_ctl_server *srv, struct client *c)
{
  ssize_t r;

  if (c->in_alloc - c->in_len < READ_CHUNK) {
    size_t n = c->in_alloc ? c->in_alloc * 2 : READ_CHUNK * 2;
    char *p;
    /* Never grow beyond one maximal line plus one chunk. */
    if (n > (size_t) CBW_CTL_MAX_LINE + 2 * READ_CHUNK)
      n = (size_t) CBW_CTL_MAX_LINE + 2 * READ_CHUNK;
    if (n < c->in_len + READ_CHUNK)
      n = c->in_len + READ_CHUNK;
    p = realloc (c->in, n);
    if (p == NULL)
      return -1;
    c->in = p;
    c->in_alloc = n;
  }
  r = recv (c->fd, c->in + c->in_len, c->in_alloc - c->in_len, MSG_DONTWAIT);
  if (r < 0)
    return (errno == EINTR || errno == EAGAIN || errno == EWOULDBLOCK) ? 0 : -1;
  if (r == 0)                  /* EOF; a partial last line is discarded */
    c->eof = true;
  c->in_len += (size_t) r;
  return client_process (srv, c);
}

#ifndef SO_PEERGROUPS
#define SO_PEERGROUPS 59         /* Linux >= 4.13 */
#endif

/* Whether `group` is one of the supplementary groups the peer process had
 * when it connected.  The kernel says how much room it needs (ERANGE);
 * that size is still bounded, as any length we are handed. */
static bool
peer_has_group (int fd, gid_t group)
{
  gid_t stackbuf[64], *groups = stackbuf;
  socklen_t len = sizeof stackbuf;
  bool found = false;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == -1) {
    if (errno != ERANGE || len == 0 ||
        len > (socklen_t) (NGROUPS_MAX * sizeof (gid_t)) ||
        (groups = malloc (len)) == NULL)
      return false;
    if (getsockopt (fd, SOL_SOCKET, SO_PEERGROUPS, groups, &len) == -1) {
      free (groups);
      return false;
    }
  }
  for (size_t i = 0; i < len / sizeof (gid_t); i++)
    if (groups[i] == group)
      found = true;
  if (groups != stackbuf)
    free (groups);
  return found;
}

/* Who may talk to a control socket: root, the server's own effective uid
 * and, with a control group, the processes in that group (their gid or a
 * supplementary group: see struct cbw_ctl_access).  The socket file's mode
 * (bind_socket) already keeps others out, so this matters when the mode
 * was widened by hand or the kernel's file check is bypassed (a descriptor
 * passed on); commands such as cbwd's backup-begin run hooks as the
 * server's user, so nobody else may ever reach them. */
static bool
peer_allowed (const struct cbw_ctl_server *srv, int fd)
{
  struct ucred cred;
  socklen_t len = sizeof cred;

  if (getsockopt (fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) == -1 ||
      len != sizeof cred)
    return false;
  if (cred.uid == 0 || cred.uid == geteuid ())
    return true;
  if (!srv->access.group_set)
    return false;
  return cred.gid == srv->access.group ||
    peer_has_group (fd, srv->access.group);
}

/* Send one error line to a client that is not taken on, and close it. */
static void
reject_client (int fd, enum cbw_ctl_error_class cls, const char *desc)
{
  char msg[320];
  int n = snprintf (msg, sizeof msg,
                    "{\"error\":{\"class\":\"%s\",\"desc\":\"%s\"}}\n",
                    cbw_ctl_error_class_name (cls), desc);
  if (n > 0 && (size_t) n < sizeof msg &&
      send (fd, msg, (size_t) n, MSG_NOSIGNAL | MSG_DONTWAIT) < 0) {
    /* nothing more we can do for this client */
  }
  close (fd);
}

static void
accept_one (struct cbw_ctl_server *srv)
{
  struct client *c = NULL;
  char *greeting;
  int fd, i;

  fd = accept4 (srv->listen_fd, NULL, NULL, SOCK_NONBLOCK | SOCK_CLOEXEC);
  if (fd < 0)
    return;                      /* EAGAIN, ECONNABORTED, EMFILE: try later */
  if (!peer_allowed (srv, fd)) {
    char desc[128];
    if (srv->access.group_set)
      snprintf (desc, sizeof desc, "permission denied: only root, the "
                "server's own uid and group %u may use this control socket",
                (unsigned) srv->access.group);
    else
      snprintf (desc, sizeof desc, "permission denied: only root and the "
                "server's own uid may use this control socket");
    reject_client (fd, CBW_CTL_PERMISSION_DENIED, desc);
    return;
  }
  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i)
    if (srv->clients[i].fd < 0) {
      c = &srv->clients[i];
      break;
    }
  if (c == NULL) {
    char desc[64];
    snprintf (desc, sizeof desc, "too many control clients (limit %d)",
              CBW_CTL_MAX_CLIENTS);
    reject_client (fd, CBW_CTL_BUSY, desc);
    return;
  }
  c->fd = fd;
  if (asprintf (&greeting, "{\"cbw\":{\"module\":\"%s\",\"version\":\"%s\"}}",
                srv->table->module, CBW_VERSION) < 0) {
    cbw_ctl__client_close (srv, c);
    return;
  }
  if (cbw_ctl__client_queue (c, greeting, strlen (greeting)) == -1 ||
      cbw_ctl__client_flush (c) == -1)
    cbw_ctl__client_close (srv, c);
  free (greeting);
}

static void *
server_thread (void *arg)
{
  struct cbw_ctl_server *srv = arg;
  struct pollfd pfd[CBW_CTL_MAX_CLIENTS + 2];
  int map[CBW_CTL_MAX_CLIENTS + 2];

  for (;;) {
    int n = 0, i, r;

    pfd[n] = (struct pollfd) { .fd = srv->wake_fd, .events = POLLIN };
    map[n++] = -1;
    pfd[n] = (struct pollfd) { .fd = srv->listen_fd, .events = POLLIN };
    map[n++] = -2;
    for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i) {
      struct client *c = &srv->clients[i];
      short ev = 0;
      if (c->fd < 0)
        continue;
      if (client_has_output (c))
        ev |= POLLOUT;
      else if (!c->closing && !c->eof)
        ev |= POLLIN;
      /* else (a subscriber after EOF): only POLLHUP, when it closes */
      pfd[n] = (struct pollfd) { .fd = c->fd, .events = ev };
      map[n++] = i;
    }
    r = poll (pfd, (nfds_t) n, -1);
    if (r < 0) {
      if (errno == EINTR) continue;
      break;                     /* cannot happen with valid fds */
    }
    if (pfd[1].revents & POLLIN)
      accept_one (srv);
    for (i = 2; i < n; ++i) {
      struct client *c = &srv->clients[map[i]];
      short re = pfd[i].revents;
      int rc = 0;
      if (re == 0 || c->fd != pfd[i].fd)
        continue;
      if (re & POLLOUT) {
        rc = cbw_ctl__client_flush (c);
        if (rc == 0)             /* more buffered lines may now run */
          rc = client_process (srv, c);
      }
      else if (re & POLLIN)
        rc = client_read (srv, c);
      else if (re & (POLLERR | POLLHUP | POLLNVAL))
        rc = -1;
      if (rc == -1)
        cbw_ctl__client_close (srv, c);
    }
    /* Events last: dropping a subscriber closes its fd, which must not
     * happen between accept and the loop above (a new client could reuse
     * the fd and the slot, and get the old one's revents). */
    if (pfd[0].revents && cbw_ctl__distribute_events (srv))
      break;                     /* stop requested */
  }
  return NULL;
}

/* Owner-only (or owner and group) before anyone can connect: connect
 * fails until listen, the file's mode is what the kernel checks on
 * connect, and bind gave it the umask's mode, which may let every local
 * user in.  The group first, then the mode: never a moment where the
 * wrong group may connect. */
static int
set_socket_mode (struct cbw_ctl_server *srv, struct cbw_err *err)
{
  mode_t mode = S_IRUSR | S_IWUSR;

  if (chmod (srv->path, mode) == -1)
    return cbw_err_set (err, errno, "control socket %s: chmod 0600: %s",
                        srv->path, errstr (errno));
  if (!srv->access.group_set)
    return 0;
  if (chown (srv->path, (uid_t) -1, srv->access.group) == -1)
    return cbw_err_set (err, errno, "control socket %s: chown to group "
                        "%u: %s", srv->path, (unsigned) srv->access.group,
                        errstr (errno));
  mode |= S_IRGRP | S_IWGRP;
  if (chmod (srv->path, mode) == -1)
    return cbw_err_set (err, errno, "control socket %s: chmod 0660: %s",
                        srv->path, errstr (errno));
  return 0;
}

/* Bind a Unix socket at path, replacing a stale socket file. */
static int
bind_socket (struct cbw_ctl_server *srv, struct cbw_err *err)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  const char *path = srv->path;
  struct stat st;
  int fd, attempt;

  if (path == NULL || path[0] == '\0')
    return cbw_err_set (err, EINVAL, "control socket: empty path");
  if (strlen (path) >= sizeof sun.sun_path)
    return cbw_err_set (err, ENAMETOOLONG,
                        "control socket %s: path too long (%zu bytes, a Unix "
                        "socket path is limited to %zu)", path, strlen (path),
                        sizeof sun.sun_path - 1);
  memcpy (sun.sun_path, path, strlen (path) + 1);

  for (attempt = 0; attempt < 2; ++attempt) {
    fd = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0)
      return cbw_err_set (err, errno, "control socket %s: socket: %s",
                          path, errstr (errno));
    if (bind (fd, (struct sockaddr *) &sun, sizeof sun) == 0)
      break;
    int e = errno;
    close (fd);
    fd = -1;
    if (e != EADDRINUSE || attempt > 0)
      return cbw_err_set (err, e, "control socket %s: bind: %s",
                          path, errstr (e));
    /* Something is there.  Replace it only if it is a socket nobody
     * answers on (left behind by a crashed process). */
    if (lstat (path, &st) == -1)
      continue;                  /* vanished meanwhile: retry */
    if (!S_ISSOCK (st.st_mode))
      return cbw_err_set (err, EEXIST,
                          "control socket %s: path exists and is not a socket",
                          path);
    int probe = socket (AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (probe < 0)
      return cbw_err_set (err, errno, "control socket %s: socket: %s",
                          path, errstr (errno));
    int cr = connect (probe, (struct sockaddr *) &sun, sizeof sun);
    int ce = errno;
    close (probe);
    if (cr == 0 || ce == EAGAIN)
      return cbw_err_set (err, EADDRINUSE,
                          "control socket %s: already in use by a running "
                          "server", path);
    if (ce != ECONNREFUSED)
      return cbw_err_set (err, ce, "control socket %s: probe: %s",
                          path, errstr (ce));
    if (unlink (path) == -1 && errno != ENOENT)
      return cbw_err_set (err, errno,
                          "control socket %s: removing stale socket: %s",
                          path, errstr (errno));
  }
  if (fd < 0)
    return cbw_err_set (err, EADDRINUSE, "control socket %s: bind failed",
                        path);
  if (set_socket_mode (srv, err) == -1) {
    close (fd);
    unlink (path);
    return -1;
  }
  if (listen (fd, CBW_CTL_MAX_CLIENTS) == -1) {
    int e = errno;
    close (fd);
    unlink (path);
    return cbw_err_set (err, e, "control socket %s: listen: %s",
                        path, errstr (e));
  }
  if (stat (path, &st) == 0) {
    srv->sock_dev = st.st_dev;
    srv->sock_ino = st.st_ino;
  }
  srv->listen_fd = fd;
  return 0;
}

struct cbw_ctl_server *
cbw_ctl_server_start (const char *path, const struct cbw_ctl_table *table,
                      void *module_data, struct cbw_err *err)
{
  return cbw_ctl_server_start_events (path, table, module_data, NULL, err);
}

struct cbw_ctl_server *
cbw_ctl_server_start_events (const char *path,
                             const struct cbw_ctl_table *table,
                             void *module_data,
                             const struct cbw_ctl_event_source *events,
                             struct cbw_err *err)
{
  return cbw_ctl_server_start_access (path, table, module_data, events, NULL,
                                      err);
}

struct cbw_ctl_server *
cbw_ctl_server_start_access (const char *path,
                             const struct cbw_ctl_table *table,
                             void *module_data,
                             const struct cbw_ctl_event_source *events,
                             const struct cbw_ctl_access *access,
                             struct cbw_err *err)
{
  struct cbw_ctl_server *srv;
  sigset_t all, old;
  int i, e;

  if (table == NULL || table->module == NULL) {
    cbw_err_set (err, EINVAL, "control socket: no command table");
    return NULL;
  }
  srv = calloc (1, sizeof *srv);
  if (srv == NULL || (srv->path = strdup (path ? path : "")) == NULL) {
    free (srv);
    cbw_err_set (err, ENOMEM, "control socket: out of memory");
    return NULL;
  }
  srv->table = table;
  srv->module_data = module_data;
  srv->events = events;
  if (access)
    srv->access = *access;
  srv->max_backlog = events && events->max_backlog ? events->max_backlog
    : CBW_CTL_EVENT_BACKLOG;
  pthread_mutex_init (&srv->qlock, NULL);
  srv->listen_fd = srv->wake_fd = -1;
  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i)
    srv->clients[i].fd = -1;

  if (bind_socket (srv, err) == -1)
    goto fail;
  srv->wake_fd = eventfd (0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (srv->wake_fd < 0) {
    cbw_err_set (err, errno, "control socket %s: eventfd: %s",
                 path, errstr (errno));
    goto fail_unlink;
  }
  /* The thread must not take the host process's signals (nbdkit, cbwd). */
  sigfillset (&all);
  pthread_sigmask (SIG_SETMASK, &all, &old);
  e = pthread_create (&srv->thread, NULL, server_thread, srv);
  pthread_sigmask (SIG_SETMASK, &old, NULL);
  if (e != 0) {
    cbw_err_set (err, e, "control socket %s: pthread_create: %s",
                 path, errstr (e));
    goto fail_unlink;
  }
  return srv;

 fail_unlink:
  unlink (srv->path);
 fail:
  if (srv->listen_fd >= 0) close (srv->listen_fd);
  if (srv->wake_fd >= 0) close (srv->wake_fd);
  pthread_mutex_destroy (&srv->qlock);
  free (srv->path);
  free (srv);
  return NULL;
}

void
cbw_ctl_server_stop (struct cbw_ctl_server *srv)
{
  uint64_t one = 1;
  struct stat st;
  int i;

  if (srv == NULL)
    return;
  {
    ACQUIRE_LOCK_FOR_CURRENT_SCOPE (&srv->qlock);
    srv->stopping = true;
  }
  while (write (srv->wake_fd, &one, sizeof one) < 0 && errno == EINTR)
    ;
  pthread_join (srv->thread, NULL);
  for (i = 0; i < CBW_CTL_MAX_CLIENTS; ++i)
    if (srv->clients[i].fd >= 0)
      cbw_ctl__client_close (srv, &srv->clients[i]);
  while (srv->qhead) {
    struct bcast *b = srv->qhead;
    srv->qhead = b->next;
    free (b);
  }
  pthread_mutex_destroy (&srv->qlock);
  close (srv->listen_fd);
  close (srv->wake_fd);
  /* Unlink only the socket we created, not one a successor bound since. */
  if (stat (srv->path, &st) == 0 && st.st_dev == srv->sock_dev &&
      st.st_ino == srv->sock_ino)
    unlink (srv->path);
  free (srv->path);
  free (srv);
}
