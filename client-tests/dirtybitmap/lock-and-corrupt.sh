#!/bin/bash
. "$(dirname "$0")/../functions.sh"
skip "todo"
