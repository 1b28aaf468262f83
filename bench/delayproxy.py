#!/usr/bin/env python3
"""delayproxy.py LISTEN_PORT TARGET_HOST:PORT DELAY_MS

A TCP delay line for benchmarks. Listens on 127.0.0.1:LISTEN_PORT and
forwards every connection to TARGET_HOST:PORT. Each chunk received in either
direction is delivered DELAY_MS milliseconds after it arrived, in order, so
a round trip costs 2*DELAY_MS while throughput is preserved (many chunks are
in flight at once; this is not stop-and-wait).

With DELAY_MS = 0 chunks are forwarded immediately; use that to measure the
proxy's own throughput ceiling.

Flow control: a direction stops reading from its source when more than
MAX_QUEUED bytes are waiting (queued in the delay line plus buffered in the
destination transport), and resumes once it has drained below half of that.
Half-close (EOF) is forwarded through the delay line as well.

Prints "delayproxy: listening on 127.0.0.1:PORT" once ready (PORT may be 0 to
pick a free port). Only loopback/explicit targets; exits on SIGINT/SIGTERM.
"""

import asyncio
import collections
import signal
import socket
import sys

MAX_QUEUED = 64 * 1024 * 1024
_EOF = object()


class Direction:
    """One direction of a proxied connection: src transport -> dst transport."""

    def __init__(self, loop, delay):
        self.loop = loop
        self.delay = delay
        self.src = None  # transport we read from
        self.dst = None  # transport we write to
        self.queue = collections.deque()  # (deadline, bytes | _EOF)
        self.queued = 0
        self.timer = None
        self.src_paused = False
        self.dst_blocked = False  # dst asked us to pause writing
        self.closed = False
        self.early = []

    # --- input side -------------------------------------------------------
    def feed(self, data):
        if self.closed:
            return
        if self.delay == 0 and not self.queue:
            self._write(data)
        else:
            self.queue.append((self.loop.time() + self.delay, data))
            self.queued += len(data)
            if self.timer is None:
                self._arm()
        self._check_pressure()

    def feed_eof(self):
        if self.closed:
            return
        if self.delay == 0 and not self.queue:
            self._deliver_eof()
        else:
            self.queue.append((self.loop.time() + self.delay, _EOF))
            if self.timer is None:
                self._arm()

    # --- output side ------------------------------------------------------
    def _arm(self):
        if self.queue and self.timer is None and not self.closed:
            self.timer = self.loop.call_at(self.queue[0][0], self._flush)

    def _flush(self):
        self.timer = None
        if self.closed:
            return
        now = self.loop.time()
        while self.queue and self.queue[0][0] <= now:
            _, data = self.queue.popleft()
            if data is _EOF:
                self._deliver_eof()
                continue
            self.queued -= len(data)
            self._write(data)
        self._arm()
        self._check_pressure()

    def set_dst(self, transport):
        self.dst = transport
        early, self.early = self.early, []
        for data in early:
            self._write(data)

    def _write(self, data):
        if self.dst is None:
            self.early.append(data)  # target not connected yet
        elif not self.dst.is_closing():
            self.dst.write(data)

    def _deliver_eof(self):
        if self.dst is None or self.dst.is_closing():
            return
        if self.dst.can_write_eof():
            self.dst.write_eof()
        else:
            self.dst.close()

    def _pending(self):
        buffered = self.dst.get_write_buffer_size() if self.dst else 0
        return self.queued + buffered

    def _check_pressure(self):
        if self.src is None or self.src.is_closing():
            return
        pending = self._pending()
        if not self.src_paused and (pending > MAX_QUEUED or self.dst_blocked):
            self.src.pause_reading()
            self.src_paused = True
        elif self.src_paused and pending < MAX_QUEUED // 2 and not self.dst_blocked:
            self.src.resume_reading()
            self.src_paused = False

    def dst_pause(self):
        self.dst_blocked = True
        self._check_pressure()

    def dst_resume(self):
        self.dst_blocked = False
        self._check_pressure()

    def close(self):
        self.closed = True
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.queue.clear()
        self.queued = 0


class Side(asyncio.Protocol):
    """Protocol for one socket. `incoming` receives what this socket reads;
    `outgoing` is the direction that writes into this socket."""

    def __init__(self, pair, incoming, outgoing):
        self.pair = pair
        self.incoming = incoming
        self.outgoing = outgoing
        self.transport = None

    def connection_made(self, transport):
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass
        transport.set_write_buffer_limits(high=4 * 1024 * 1024)
        self.incoming.src = transport
        self.outgoing.set_dst(transport)

    def data_received(self, data):
        self.incoming.feed(data)

    def eof_received(self):
        self.incoming.feed_eof()
        return True  # keep our write side open (half-close)

    def pause_writing(self):
        self.outgoing.dst_pause()

    def resume_writing(self):
        self.outgoing.dst_resume()

    def connection_lost(self, exc):
        self.pair.lost(self)


class Pair:
    """A client<->target connection pair with its two directions."""

    def __init__(self, loop, delay):
        self.loop = loop
        self.delay = delay
        self.up = Direction(loop, delay)  # client -> target
        self.down = Direction(loop, delay)  # target -> client
        self.client = Side(self, self.up, self.down)
        self.target = Side(self, self.down, self.up)
        self.done = False

    def lost(self, side):
        # One socket is gone. Deliver what is already in flight towards the
        # other side (after the delay), then close it.
        if self.done:
            return
        self.done = True
        other = self.target if side is self.client else self.client
        towards_other = self.up if other is self.target else self.down
        self.up.src = self.down.src = None
        wait = self.delay + 0.05 if towards_other.queue else 0

        def finish():
            self.up.close()
            self.down.close()
            if other.transport is not None and not other.transport.is_closing():
                other.transport.close()

        self.loop.call_later(wait, finish)


async def handle_client(loop, delay, target_host, target_port, client_sock):
    pair = Pair(loop, delay)
    try:
        c_tr, _ = await loop.connect_accepted_socket(lambda: pair.client, client_sock)
    except OSError:
        client_sock.close()
        return
    c_tr.pause_reading()
    try:
        await loop.create_connection(lambda: pair.target, target_host, target_port)
    except OSError as e:
        print(f"delayproxy: connect to {target_host}:{target_port} failed: {e}", file=sys.stderr)
        c_tr.close()
        return
    # both transports are wired into the directions in Side.connection_made
    c_tr.resume_reading()


async def main():
    if len(sys.argv) != 4:
        print(__doc__.strip().splitlines()[0], file=sys.stderr)
        sys.exit(2)
    listen_port = int(sys.argv[1])
    host, _, port = sys.argv[2].rpartition(":")
    target_port = int(port)
    delay = float(sys.argv[3]) / 1000.0
    loop = asyncio.get_running_loop()

    lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind(("127.0.0.1", listen_port))
    lsock.listen(128)
    lsock.setblocking(False)
    print(f"delayproxy: listening on 127.0.0.1:{lsock.getsockname()[1]}", flush=True)

    stop = loop.create_future()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: stop.done() or stop.set_result(None))

    tasks = set()

    async def acceptor():
        while True:
            csock, _ = await loop.sock_accept(lsock)
            t = loop.create_task(handle_client(loop, delay, host, target_port, csock))
            tasks.add(t)
            t.add_done_callback(tasks.discard)

    acc = loop.create_task(acceptor())
    await stop
    acc.cancel()
    lsock.close()


if __name__ == "__main__":
    try:
        asyncio.run(main())
    except KeyboardInterrupt:
        pass
