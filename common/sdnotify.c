/* cbw — common/sdnotify.c: the sd_notify(3) datagram protocol, see
 * sdnotify.h.  A daemon that reports readiness this way lets systemd order
 * units after it (Type=notify) instead of guessing with a delay.
 *
 * Locking: none (no shared state).
 */
#include <errno.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "sdnotify.h"

int
cbw_sd_notify (const char *state)
{
  const char *path = getenv ("NOTIFY_SOCKET");
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  size_t len;

  if (path == NULL || path[0] == '\0')
    return 0;
  len = strlen (path);
  /* A path socket or an abstract one ('@' stands for the leading NUL). */
  if ((path[0] != '/' && path[0] != '@') || len >= sizeof sa.sun_path)
    return -EINVAL;
  memcpy (sa.sun_path, path, len);
  if (path[0] == '@')
    sa.sun_path[0] = '\0';
  socklen_t salen = (socklen_t) (offsetof (struct sockaddr_un, sun_path) + len
                                 + (path[0] == '/' ? 1 : 0));

  int fd = socket (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
  if (fd < 0)
    return -errno;
  ssize_t r = sendto (fd, state, strlen (state), MSG_NOSIGNAL, (struct sockaddr *) &sa, salen);
  int e = errno;
  close (fd);
  if (r < 0)
    return -e;
  return 1;
}
