#!/usr/bin/env python3
"""proxyceiling.py [DELAY_MS [MIB]]

Measures bench/delayproxy.py on its own, over 127.0.0.1 only:
  - round-trip time of a 1-byte ping-pong (median of 20), direct and via proxy;
  - one-way bulk throughput of MIB MiB (default 1024), direct and via proxy,
    in both directions (client->server upload and server->client download).
Prints one line per measurement as `key value`, for bench/run.sh to collect.
Everything is bounded: fixed counts, socket timeouts of 60 s.
"""

import os
import socket
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
CHUNK = 1024 * 1024


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def server(lsock, total):
    """Accept connections forever; each connection's first byte says what to do:
    'p' = echo 1-byte pings, 'u' = sink `total` bytes then reply 'k', 'd' = send `total` bytes."""
    while True:
        try:
            c, _ = lsock.accept()
        except OSError:
            return
        threading.Thread(target=serve_one, args=(c, total), daemon=True).start()


def serve_one(c, total):
    c.settimeout(60)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        mode = c.recv(1)
        if mode == b"p":
            while True:
                b = c.recv(1)
                if not b:
                    break
                c.sendall(b)
        elif mode == b"u":
            buf = bytearray(CHUNK)
            got = 0
            while got < total:
                n = c.recv_into(buf)
                if n == 0:
                    break
                got += n
            c.sendall(b"k")
        elif mode == b"d":
            data = os.urandom(CHUNK)
            sent = 0
            while sent < total:
                c.sendall(data)
                sent += len(data)
            c.shutdown(socket.SHUT_WR)
            c.recv(1)
    except OSError:
        pass
    finally:
        c.close()


def connect(port):
    c = socket.create_connection(("127.0.0.1", port), timeout=60)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return c


def rtt(port):
    c = connect(port)
    c.sendall(b"p")
    samples = []
    for _ in range(20):
        t = time.perf_counter()
        c.sendall(b"x")
        if c.recv(1) != b"x":
            raise RuntimeError("bad echo")
        samples.append(time.perf_counter() - t)
    c.close()
    return statistics.median(samples) * 1000


def upload(port, total):
    c = connect(port)
    data = os.urandom(CHUNK)
    t = time.perf_counter()
    c.sendall(b"u")
    sent = 0
    while sent < total:
        c.sendall(data)
        sent += len(data)
    if c.recv(1) != b"k":
        raise RuntimeError("no ack")
    dt = time.perf_counter() - t
    c.close()
    return total / dt / 1e6


def download(port, total):
    c = connect(port)
    buf = bytearray(CHUNK)
    t = time.perf_counter()
    c.sendall(b"d")
    got = 0
    while got < total:
        n = c.recv_into(buf)
        if n == 0:
            break
        got += n
    dt = time.perf_counter() - t
    c.close()
    if got < total:
        raise RuntimeError(f"short download {got}")
    return total / dt / 1e6


def main():
    delay = sys.argv[1] if len(sys.argv) > 1 else "0"
    mib = int(sys.argv[2]) if len(sys.argv) > 2 else 1024
    total = mib * 1024 * 1024
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(16)
    sport = lsock.getsockname()[1]
    threading.Thread(target=server, args=(lsock, total), daemon=True).start()

    pport = free_port()
    proxy = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "delayproxy.py"), str(pport), f"127.0.0.1:{sport}", delay],
        stdout=subprocess.PIPE, text=True)
    try:
        line = proxy.stdout.readline()
        if "listening" not in line:
            raise RuntimeError("proxy did not start")
        print(f"rtt_direct_ms {rtt(sport):.3f}")
        print(f"rtt_proxy_ms {rtt(pport):.3f}")
        print(f"upload_direct_MBps {upload(sport, total):.0f}")
        print(f"upload_proxy_MBps {upload(pport, total):.0f}")
        print(f"download_direct_MBps {download(sport, total):.0f}")
        print(f"download_proxy_MBps {download(pport, total):.0f}")
    finally:
        proxy.terminate()
        try:
            proxy.wait(10)
        except subprocess.TimeoutExpired:
            proxy.kill()
        lsock.close()


if __name__ == "__main__":
    main()
