#!/bin/bash
# f-cbwd-store.sh - cbwd store export (the backup target) on disk.img: reads and the
# same fio write jobs as case A (nbdkit file).
. "$(dirname "$0")/cases.sh"
CASE=${CASE_NAME:-F-cbwd-store}
ensure_disk; warm_cache
S=$SOCKDIR/f.sock
rm -f "$S"; srv "$CBWD" --listen "unix:$S" --export "name=store,type=store,path=$DISK"; P=$!; register_pid $P
U="nbd+unix:///store?socket=$S"; wait_nbd "$U"; record_flags "$CASE" "$U"
bench_read "$CASE" seqread "$U"
bench_read "$CASE" seqread_1conn "$U" --connections=1
bench_fio "$CASE" "$U"
record_mem "$CASE" $P; stop_pid $P
log done
