#!/bin/bash
# cbw-faults-stop: see cbw-faults.inc (FAULT=stop), both failure policies.
FAULT=stop
. "$(dirname "$0")/cbw-faults.inc"
