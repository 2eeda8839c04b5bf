/* cbw — common/sdnotify.h: readiness and status notifications to the service
 * manager (systemd's Type=notify), without linking libsystemd.
 *
 * The protocol is one datagram of "KEY=VALUE\n" lines sent to the AF_UNIX
 * socket named by $NOTIFY_SOCKET (a path, or "@name" for an abstract
 * socket); see sd_notify(3).  Without $NOTIFY_SOCKET (not started by
 * systemd, or by a Type= other than notify) nothing is sent.
 *
 * Locking: none; the call is self-contained (one socket per call).
 */
#ifndef CBW_SDNOTIFY_H
#define CBW_SDNOTIFY_H

/* Send STATE (e.g. "READY=1\nSTATUS=serving") to the service manager.
 * Returns 1 if sent, 0 if there is no $NOTIFY_SOCKET, or a negative errno
 * (-EINVAL for an unusable $NOTIFY_SOCKET, or the sendmsg error). */
int cbw_sd_notify (const char *state);

#endif /* CBW_SDNOTIFY_H */
