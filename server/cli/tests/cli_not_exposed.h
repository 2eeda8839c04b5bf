/* cbw — server/cli/tests/cli_not_exposed.h: arguments of cbwd's control
 * commands that the subcommand table of `cbw` (subs[] in server/cli/cbw.c)
 * does not offer, each with the reason (rows of not_exposed[] in
 * test_cli_table.c: command, argument, why).  A new argument in
 * server/orch/commands.c gets a `cbw` option in subs[] or a row here. */
{ "subscribe", "since", "sent by `cbw events --follow --since SEQ`, which parses its own "
  "options outside subs[] (events_cmd)" },
