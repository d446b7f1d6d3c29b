#!/usr/bin/env python3
"""Peak memory of `pageferry recv` under hostile handshakes (docs/RELIABILITY.md).

Starts a destination, sends it handshakes a hostile peer might (a 37 MB Hello announcing 2M
regions, a 1 TiB region, a 4 EiB region), each on a fresh destination, and prints what each
got back and the destination's peak resident memory (VmHWM) and whether any file was left.
Usage: python3 scripts/hostile-hello.py [path/to/pageferry]
"""
import json, os, socket, struct, subprocess, sys, tempfile, time, zlib

EXE = sys.argv[1] if len(sys.argv) > 1 else "target/release/pageferry"


def crc32c(data, crc=0):
    # Bitwise CRC32C (Castagnoli), reflected, as the wire uses.
    crc ^= 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def frame(msg, version=2, fake_len=None):
    body = json.dumps(msg).encode()
    hdr = b"PFCT" + struct.pack("<HII", version, fake_len if fake_len is not None else len(body), 0)
    if fake_len is not None:
        return hdr  # a header announcing a body that is never sent in full
    # CRC over header+body: only small frames are checked here, so a slow CRC is fine.
    return hdr + body + struct.pack("<I", crc32c(hdr + body))


def hello(regions):
    return {"type": "hello", "versions": {"min": 2, "max": 2}, "session": "0" * 32, "role": "control", "channel": 0,
            "channels": 1, "method": 0, "level": 0, "regions": regions,
            "wants": {"tls": False, "postcopy": False, "auto": False}, "verify": True}


def start():
    d = tempfile.mkdtemp(dir="/dev/shm", prefix="pf-hostile-")
    img = os.path.join(d, "dst.img")
    p = subprocess.Popen([EXE, "recv", "--listen", "127.0.0.1:0", "--image", img, "--accept-timeout", "120"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    addr = p.stdout.readline().strip().split()[-1]
    return d, p, addr


# Destinations are started before any payload is built: a child's peak RSS (wait4) counts
# the memory of the script it was forked from.
DESTS = [start() for _ in range(4)]


def case(name, payload):
    d, p, addr = DESTS.pop(0)
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    t = time.time()
    try:
        s.sendall(payload)
        s.settimeout(10)
        reply = s.recv(4096)
    except Exception as e:  # reset: dropped
        reply = b""
    took = time.time() - t
    s.close()
    time.sleep(0.2)
    pid, _, ru = os.wait4(p.pid, os.WNOHANG)
    if pid == 0:
        p.send_signal(15)  # it dropped the connection and still listens: end it (SIGTERM = cancel)
        _, _, ru = os.wait4(p.pid, 0)
    # ru: the peak RSS of the whole run.
    hwm = f"{ru.ru_maxrss / 1024:.1f} MiB"
    p.returncode = 0
    err = p.stderr.read().strip().splitlines()
    left = os.listdir(d)
    what = "no reply (connection dropped)" if not reply else reply[14:-4].decode(errors="replace")
    print(f"| {name} | {len(payload)} B | {what[:120]} | {took*1000:.0f} ms | {hwm} | {left or 'none'} |")
    for f in left:
        os.unlink(os.path.join(d, f))
    os.rmdir(d)


print("| hostile handshake | bytes sent | destination's answer | time | recv peak RSS (VmHWM) | files left |")
print("|---|---|---|---|---|---|")
# The 2M-region Hello is only announced in full (its header) and sent in part; built as one
# string and cut before any destination is started, so this script's own memory (which a
# forked child's peak RSS would include) stays small.
big = json.dumps(hello([])).encode().replace(b'"regions": []', b'"regions": [' + b",".join(b'["r%d", 4096]' % i for i in range(2_000_000)) + b"]")
big_len, big_head = len(big), big[: 1 << 20]
del big
case(f"Hello announcing 2M regions ({big_len / 1e6:.0f} MB frame)", frame(None, fake_len=big_len) + big_head)
case("one 1 TiB region", frame(hello([["image", 1 << 40]])))
case("one 4 EiB region", frame(hello([["image", 1 << 62]])))
case("1025 regions", frame(hello([[f"r{i}", 4096] for i in range(1025)])))
