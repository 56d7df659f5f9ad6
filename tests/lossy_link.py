"""A TCP proxy to Redis that loses replies, for tests and the chaos harness (never a mock: real Redis behind).

Redis runs every command it receives; a reply lost on the way back (a link cut after Redis ran the command)
makes the client send the same command again. `drop(pattern, times)` loses the reply to the next `times`
requests whose bytes contain `pattern` (e.g. a script's SHA1) and closes that connection, as a cut link
would; `rate` loses the reply to that share of all requests. The client's re-send of a lost request gets
through. It runs in a thread of its own, so sync code (tests, harnesses) can use it.
"""

from __future__ import annotations

import asyncio
import random
import threading


class LossyLink:
    def __init__(self, upstream_port: int, rate: float = 0.0, seed: int = 0):
        self.upstream_port, self.rate = upstream_port, rate
        self.rng = random.Random(seed)
        self.rules: list[list] = []  # [pattern, times left]
        self.dropped = 0
        self._last_lost: bytes | None = None
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> int:
        self._thread.start()
        self._ready.wait(10)
        return self.port

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def drop(self, pattern: bytes, times: int = 1) -> None:
        self.rules.append([pattern, times])

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, "127.0.0.1", 0))
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()

    def _lose(self, request: bytes) -> bool:
        if request == self._last_lost:  # the client's re-send of a lost request gets through
            self._last_lost = None
            return False
        lose = self.rate > 0 and self.rng.random() < self.rate
        for rule in self.rules:
            if not lose and rule[1] > 0 and rule[0] in request:
                rule[1] -= 1
                lose = True
        if lose:
            self._last_lost = request
        return lose

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_r, up_w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            writer.close()
            return
        lose = asyncio.Event()

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self._lose(data):
                    lose.set()
                up_w.write(data)
                await up_w.drain()

        async def downstream() -> None:
            while data := await up_r.read(65536):
                if lose.is_set():  # Redis ran it; the client never hears so
                    self.dropped += 1
                    return
                writer.write(data)
                await writer.drain()

        tasks = [asyncio.ensure_future(upstream()), asyncio.ensure_future(downstream())]
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for w in (writer, up_w):
            w.close()
