#!/bin/bash
# cbw-faults-full: see cbw-faults.inc (FAULT=full), both failure policies.
FAULT=full
. "$(dirname "$0")/cbw-faults.inc"
