# cbw — client-tests/backup/fake_qga.py: a stand-in for qemu-guest-agent on
# the host side of its channel (a Unix socket), for guest-agent.sh.
#   python3 fake_qga.py SOCKET MODEFILE LOG FLUSH-URI
# Speaks the agent's JSON lines: guest-sync (answers a stale id first, as a
# channel with leftovers would), guest-fsfreeze-freeze, guest-fsfreeze-thaw.
# MODEFILE holds the mode, re-read on every command: "ok" (a freeze first
# writes 64 KiB of 0x09 at offset 0 of FLUSH-URI, the way a guest's fsfreeze
# flushes its file systems, then answers), "error" (freeze answers an
# error), "mute" (freeze never answers).  Every command goes to LOG.
import json, os, socket, subprocess, sys, time

path, modefile, logpath, flush_uri = sys.argv[1:5]
try:
    os.unlink(path)
except FileNotFoundError:
    pass
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.listen(4)

def log(s):
    with open(logpath, "a") as f:
        f.write(s + "\n")

while True:
    conn, _ = srv.accept()
    buf = b""
    with conn:
        while True:
            data = conn.recv(65536)
            if not data:
                break
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                line = line.lstrip(b"\xff").strip()
                if not line:
                    continue
                req = json.loads(line)
                cmd = req.get("execute")
                mode = open(modefile).read().strip()
                log(cmd)
                if cmd == "guest-sync":
                    reply = [{"return": 4242}, {"return": req["arguments"]["id"]}]
                elif cmd == "guest-fsfreeze-freeze":
                    if mode == "mute":
                        time.sleep(3600)
                    if mode == "error":
                        reply = [{"error": {"class": "GenericError",
                                            "desc": "fsfreeze is disabled in this guest"}}]
                    else:
                        t0 = time.monotonic()
                        r = subprocess.run(["qemu-io", "-f", "raw", "-c",
                                            "write -P 9 0 64k", flush_uri],
                                           stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL, timeout=30)
                        log("flush rc=%d in %.1fs" % (r.returncode, time.monotonic() - t0))
                        reply = [{"return": 1}]
                elif cmd == "guest-fsfreeze-thaw":
                    reply = [{"return": 1}]
                else:
                    reply = [{"error": {"class": "CommandNotFound", "desc": cmd}}]
                for r in reply:
                    conn.sendall(json.dumps(r).encode() + b"\n")
