/* cbw — common/tests/nbdkit_test_util.h: a throwaway `nbdkit memory` on a
 * Unix socket for unit tests that need a real NBD peer (a cbw target, a pit
 * upstream).  It returns once nbdkit ACCEPTS connections, not once its
 * socket file exists: nbdkit binds before it listens, and a connect in
 * between is refused (a race seen under load).
 * Header-only (static inline), Criterion assertions on failure; no locking.
 * Link the test with the INTERFACE target cbwtestutil. */
#ifndef CBW_NBDKIT_TEST_UTIL_H
#define CBW_NBDKIT_TEST_UTIL_H

#include <criterion/criterion.h>
#include <spawn.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/types.h>
#include <sys/un.h>
#include <unistd.h>

extern char **environ;

/* 0 if something accepts a connection on the Unix socket path. */
static inline int
test_unix_connect_probe (const char *path)
{
  struct sockaddr_un sun = { .sun_family = AF_UNIX };
  cr_assert_lt (strlen (path), sizeof sun.sun_path, "socket path too long: %s", path);
  memcpy (sun.sun_path, path, strlen (path) + 1);
  int fd = socket (AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
  cr_assert_geq (fd, 0);
  int r = connect (fd, (struct sockaddr *) &sun, sizeof sun);
  close (fd);
  return r;
}

/* Start `nbdkit -f -U sock memory SIZE`; its pid once it accepts (10 s). */
static inline pid_t
test_start_nbdkit_memory (const char *sock, uint64_t size)
{
  char sockarg[256], sizearg[32];
  snprintf (sockarg, sizeof sockarg, "%s", sock);
  snprintf (sizearg, sizeof sizearg, "%llu", (unsigned long long) size);
  char *argv[] = { "nbdkit", "-f", "-U", sockarg, "memory", sizearg, NULL };
  pid_t pid;
  cr_assert_eq (posix_spawnp (&pid, "nbdkit", NULL, NULL, argv, environ), 0);
  for (int i = 0; i < 200; ++i) {
    if (test_unix_connect_probe (sock) == 0)
      return pid;
    usleep (50000);
  }
  cr_assert_fail ("nbdkit memory on %s did not accept connections in 10 s", sock);
  return -1;
}

#endif
