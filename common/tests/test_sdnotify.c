/* cbw — common/tests/test_sdnotify.c: cbw_sd_notify() delivers its state as
 * one datagram to $NOTIFY_SOCKET (path and abstract sockets), does nothing
 * without it, and refuses a malformed one. */
#include <criterion/criterion.h>
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "sdnotify.h"

static int
bind_dgram (const char *name, bool abstract)
{
  struct sockaddr_un sa = { .sun_family = AF_UNIX };
  int fd = socket (AF_UNIX, SOCK_DGRAM, 0);
  cr_assert_geq (fd, 0);
  size_t len = strlen (name);
  socklen_t salen;
  if (abstract) {
    memcpy (sa.sun_path + 1, name, len);
    salen = offsetof (struct sockaddr_un, sun_path) + 1 + len;
  } else {
    memcpy (sa.sun_path, name, len);
    salen = sizeof sa;
  }
  cr_assert_eq (bind (fd, (struct sockaddr *) &sa, salen), 0, "bind: %s", strerror (errno));
  return fd;
}

static void
expect_datagram (int fd, const char *want)
{
  char buf[256];
  ssize_t r = recv (fd, buf, sizeof buf - 1, MSG_DONTWAIT);
  cr_assert_gt (r, 0, "no datagram received");
  buf[r] = '\0';
  cr_assert_str_eq (buf, want);
}

Test (sdnotify, path_socket)
{
  char dir[] = "/tmp/cbw-sdnotify.XXXXXX", path[64];
  cr_assert_not_null (mkdtemp (dir));
  snprintf (path, sizeof path, "%s/notify", dir);
  int fd = bind_dgram (path, false);
  setenv ("NOTIFY_SOCKET", path, 1);
  cr_assert_eq (cbw_sd_notify ("READY=1\nSTATUS=serving"), 1);
  expect_datagram (fd, "READY=1\nSTATUS=serving");
  close (fd);
  unlink (path);
  rmdir (dir);
}

Test (sdnotify, abstract_socket)
{
  char name[64], env[80];
  snprintf (name, sizeof name, "cbw-sdnotify-test-%d", (int) getpid ());
  int fd = bind_dgram (name, true);
  snprintf (env, sizeof env, "@%s", name);
  setenv ("NOTIFY_SOCKET", env, 1);
  cr_assert_eq (cbw_sd_notify ("STOPPING=1"), 1);
  expect_datagram (fd, "STOPPING=1");
  close (fd);
}

Test (sdnotify, absent_or_bad)
{
  unsetenv ("NOTIFY_SOCKET");
  cr_assert_eq (cbw_sd_notify ("READY=1"), 0);
  setenv ("NOTIFY_SOCKET", "relative/path", 1);
  cr_assert_eq (cbw_sd_notify ("READY=1"), -EINVAL);
  setenv ("NOTIFY_SOCKET", "/nonexistent-dir/notify", 1);
  cr_assert_lt (cbw_sd_notify ("READY=1"), 0);
}
