#!/usr/bin/python3
# cbw — client-tests/virtnbdbackup/vnb_driver.py: runs virtnbdbackup's own
# backup code against cbwd, with cbw in the place of libvirt.
#
# virtnbdbackup's command line does all of its control through libvirt
# (domain lookup, backupBegin with a checkpoint XML, checkpoint redefinition),
# so it cannot run against cbw.  Its per-disk reader can: this program loads
# the installed `virtnbdbackup` program as a module and runs the same steps
# as its main() for a running domain, with one object replaced: the libvirt
# client.  What stays virtnbdbackup's code, unchanged:
#  - handleCheckpoints(): the checkpoint names (virtnbdbackup.0, .1, ...),
#    the parent of an incremental or differential, the DOMAIN.cpt file;
#  - saveCheckpointFile(), backupConfig() (vmconfig.*.xml, which
#    virtnbdrestore needs);
#  - backupDisk() per disk in a thread pool, as main() runs it: it connects
#    with its nbdcli client to nbd+unix:///TARGET?socket=SOCKET (export name
#    = the disk's target), reads base:allocation for a full backup or
#    qemu:dirty-bitmap:backup-TARGET for inc/diff, and writes its sparse
#    stream files.
# The stand-in (CbwVirt) turns libvirt's backupBegin/backupEnd into
# `cbw backup begin` / `cbw backup end` with the same checkpoint semantics:
# full and inc create the checkpoint virtnbdbackup chose, inc and diff read
# the changes since its parent, diff creates none; a full backup first
# deletes cbw's virtnbdbackup.* checkpoints, as virtnbdbackup deletes
# libvirt's.  It checks that cbwd's point-in-time URI of each disk is the one
# virtnbdbackup builds (same socket, export name = target) and fails if not.
#
# --pace FILE:N (test only): before each of a disk's first two data reads,
# wait until the number in FILE (a guest writer's count of completed writes)
# has grown by N, so the guest provably writes after the point in time while
# the reader is in the middle of a disk (between its block status query and
# its reads, and between two reads).
# The wait wraps virtnbdbackup's lib.writeBlock/writeChunk; their reads are
# untouched.
#
# Locking: one process; the per-disk threads share only pace()'s per-disk
# call counts (under its lock) and virtnbdbackup's own state.
import argparse
import importlib.machinery
import importlib.util
import json
import logging
import os
import shutil
import subprocess
import sys
import threading
import time
import urllib.parse
from argparse import Namespace
from concurrent.futures import ThreadPoolExecutor, as_completed
from html import escape

DOMAIN_XML = """<domain type='kvm'>
  <name>{domain}</name>
  <devices>
{disks}  </devices>
</domain>
"""
DISK_XML = """    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>
"""


def load_virtnbdbackup():
    """Import the installed virtnbdbackup program (a script without .py)."""
    path = shutil.which("virtnbdbackup") or "/usr/bin/virtnbdbackup"
    loader = importlib.machinery.SourceFileLoader("virtnbdbackup_prog", path)
    spec = importlib.util.spec_from_loader(loader.name, loader)
    mod = importlib.util.module_from_spec(spec)
    loader.exec_module(mod)
    return mod


class CbwError(Exception):
    pass


class CbwVirt:
    """The parts of virtnbdbackup's libvirt client that a running-domain
    backup calls, done by cbw."""

    remoteHost = ""

    def __init__(self, cbw, begin_args):
        self.cbw = cbw
        self.begin_args = begin_args
        self.begun = False

    def _run(self, *argv):
        p = subprocess.run([self.cbw, "--json", *argv], capture_output=True, text=True)
        if p.returncode != 0:
            raise CbwError(f"cbw {' '.join(argv)}: exit {p.returncode}: {p.stderr.strip()}")
        return json.loads(p.stdout) if p.stdout.strip() else {}

    # virtnbdbackup re-defines its saved checkpoint XMLs into libvirt after a
    # libvirt restart; cbw keeps its checkpoints itself.
    def redefineCheckpoints(self, _dom, _args):
        return True

    def removeAllCheckpoints(self, _dom, _checkpoints, _args, prefix):
        names = [c["name"] for c in self._run("checkpoint", "list").get("checkpoints", [])]
        for n in reversed(names):          # newest first: each merges into an older one
            if n.startswith(prefix):
                logging.info("cbw: deleting checkpoint %s", n)
                self._run("checkpoint", "delete", n)
        return True

    def startBackup(self, args, _dom, disks):
        argv = ["backup", "begin"]
        for d in disks:
            argv += ["--disk", d.target]
        if args.cpt.parent:
            argv += ["--incremental", args.cpt.parent]
        if args.level not in ("copy", "diff"):
            argv += ["--checkpoint", args.cpt.name]
        argv += self.begin_args
        logging.info("cbw: %s", " ".join(argv))
        out = self._run(*argv)
        self.begun = True
        by_name = {d["name"]: d for d in out.get("disks", [])}
        for d in disks:
            uri = by_name.get(d.target, {}).get("pit-uri", "")
            u = urllib.parse.urlsplit(uri)
            sock = urllib.parse.parse_qs(u.query).get("socket", [""])[0]
            if u.scheme != "nbd+unix" or u.path != "/" + d.target or not sock:
                raise CbwError(f"disk {d.target}: point-in-time URI {uri!r} is not "
                               f"nbd+unix:///{d.target}?socket=... (is cbwd serving the exports?)")
            if args.socketfile not in ("", sock):
                raise CbwError(f"disks on two sockets: {args.socketfile} and {sock}")
            args.socketfile = sock
            if args.level in ("inc", "diff") and by_name[d.target].get("bitmap") != f"backup-{d.target}":
                raise CbwError(f"disk {d.target}: bitmap {by_name[d.target].get('bitmap')!r}, "
                               f"virtnbdbackup reads backup-{d.target}")

    def stopBackup(self, _dom):
        if self.begun:
            self._run("backup", "end")
            self.begun = False
        return True

    # libvirt's checkpoint XML dump into --checkpointdir: nothing to save.
    def backupCheckpoint(self, _args, _dom):
        return True


def pace(vnb, spec):
    """Delay each disk's first two data reads until the guest wrote N more times."""
    path, n = spec.rsplit(":", 1)
    n = int(n)
    done, lock = {}, threading.Lock()

    def count():
        try:
            with open(path) as f:
                return int(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0

    def wait_once():
        name = threading.current_thread().name     # backupDisk names it after the target
        with lock:
            calls = done.get(name, 0)
            if calls >= 2:
                return
            done[name] = calls + 1
        start, deadline = count(), time.monotonic() + 60
        while count() < start + n:
            if time.monotonic() > deadline:
                raise CbwError(f"{name}: the guest writer made no progress in 60 s ({path})")
            time.sleep(0.02)
        logging.info("pace: %s: guest wrote %d times before data read %d", name, count() - start,
                     calls + 1)

    def wrap(f):
        def w(*a, **k):
            wait_once()
            return f(*a, **k)
        return w

    vnb.lib.writeBlock = wrap(vnb.lib.writeBlock)
    vnb.lib.writeChunk = wrap(vnb.lib.writeChunk)


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--cbw", required=True, help="the cbw CLI (CBW_SOCKET in the environment)")
    ap.add_argument("-d", "--domain", default="cbwvm")
    ap.add_argument("-l", "--level", required=True, choices=["copy", "full", "inc", "diff"])
    ap.add_argument("-o", "--output", required=True)
    ap.add_argument("--disk", action="append", required=True, metavar="TARGET=IMAGE",
                    help="a cbw disk (TARGET: its cbw name) and its image path")
    ap.add_argument("--format", default="qcow2",
                    help="disk format told to virtnbdbackup (raw disks get no incrementals there)")
    ap.add_argument("--begin-arg", action="append", default=[],
                    help="extra argument for `cbw backup begin`")
    ap.add_argument("--pace", default=None, metavar="FILE:N",
                    help="test only: let a guest writer write N times before a disk's first two reads")
    ap.add_argument("-z", "--compress", type=int, default=False)
    ap.add_argument("-v", "--verbose", action="store_true", help="virtnbdbackup's debug log")
    a = ap.parse_args()

    vnb = load_virtnbdbackup()
    logging.basicConfig(level=logging.DEBUG if a.verbose else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(module)s [%(threadName)s]: %(message)s")
    os.makedirs(a.output, exist_ok=True)
    disks = []
    for spec in a.disk:
        target, path = spec.split("=", 1)
        disks.append(vnb.DomainDisk(target, a.format, os.path.basename(path), path, []))

    # every attribute of virtnbdbackup's parsed command line the steps read
    args = Namespace(
        domain=a.domain, level=a.level, type="stream", raw=False, output=a.output,
        checkpointdir=f"{a.output}/checkpoints", scratchdir="/var/tmp", include=None,
        exclude=None, socketfile="", noprogress=True, compress=a.compress, worker=len(disks),
        freeze_mountpoint=None, strict=False, threshold=None, syslog=False, qemu=False,
        startonly=False, killonly=False, printonly=False, verbose=a.verbose, nbd_port=10809,
        nbd_ip="", tls=False, tls_cert="/etc/pki/qemu/", uri="", user=None, password=None,
        ssh_user=None, stdout=False, sshClient=None, diskInfo=[], offline=False, info={})

    # the checks and switches main() makes before it touches libvirt
    if a.level != "copy" and not vnb.lib.hasQcowDisks(disks):
        logging.info("Only raw disks attached, switching to backup mode copy.")
        args.level = "copy"
    if args.level in ("copy", "full") and not vnb.lib.targetIsEmpty(args):
        sys.exit("target directory already contains a full or copy backup")
    if vnb.hasPartial(args):
        sys.exit("partial backup in the target directory")
    os.makedirs(args.checkpointdir, exist_ok=True)

    virt = CbwVirt(a.cbw, a.begin_arg)
    vnb.handleCheckpoints(args, virt, None)
    if a.pace:
        pace(vnb, a.pace)
    try:
        virt.startBackup(args, None, disks)
        if args.level not in ("copy", "diff"):
            vnb.saveCheckpointFile(args)
        fileStream = vnb.getFileStream(args, vnb.output.target())
        with ThreadPoolExecutor(max_workers=args.worker) as ex:
            futs = {ex.submit(vnb.backupDisk, args, d, i, fileStream, virt): d
                    for i, d in enumerate(disks)}
            for f in as_completed(futs):
                if f.result() is not True:
                    raise CbwError(f"backup of disk {futs[f].target} failed")
    finally:
        virt.stopBackup(None)
    xml = DOMAIN_XML.format(domain=escape(a.domain), disks="".join(
        DISK_XML.format(fmt=escape(d.format, quote=True), path=escape(d.path, quote=True),
                        target=escape(d.target, quote=True)) for d in disks))
    if vnb.backupConfig(args, xml) is None:
        sys.exit("could not save the domain config")
    print(json.dumps({"level": args.level, "checkpoint": args.cpt.name,
                      "parent": args.cpt.parent, "socket": args.socketfile}))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except CbwError as e:
        sys.exit(f"vnb_driver: {e}")
