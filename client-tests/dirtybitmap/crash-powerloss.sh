#!/bin/bash
# cbw — client-tests/dirtybitmap/crash-powerloss.sh: simulated power-loss rounds (see crash-common.sh).
MODE=powerloss
. "$(dirname "$0")/crash-common.sh"
