/* cbw — plugin/cbw/gate.h: the write gate.  Every guest write, write-zeroes
 * and trim passes it; `begin`, `end` and `quiesce` close it and drain the
 * writes in flight.  See gate.c. */
#ifndef CBW_GATE_H
#define CBW_GATE_H

#include <stdbool.h>
#include <stdint.h>

/* Guest side: enter before the write (waits only while the gate is closed),
 * leave after it completed. */
void cbw_gate_enter (void);
void cbw_gate_leave (void);

/* Control side (one control thread).  close: new writes wait; then wait up
 * to deadline for the writes in flight to finish.  Returns 0, or -1 if they
 * did not drain in time (the gate is then re-opened).  open: undo one close. */
int cbw_gate_close_and_drain (int64_t deadline_ns);
void cbw_gate_open (void);

/* quiesce: close + drain, and hold the gate closed until resume or until
 * hold_ms passed; then the first waiting/arriving writer re-opens it and the
 * quiesce counts as expired.  resume returns 0, or -1 if the hold had
 * already expired (writes resumed by themselves). */
int cbw_gate_quiesce (int64_t drain_deadline_ns, int64_t hold_ms);
int cbw_gate_resume (bool *was_quiesced);
bool cbw_gate_quiesced (void);
uint64_t cbw_gate_in_flight (void);

#endif
