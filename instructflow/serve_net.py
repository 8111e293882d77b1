"""The network edge of `instructflow serve`: open connections capped, logs bounded.

Each open connection holds a file descriptor; with no cap, a flood of idle connections used
them all up, after which every accept failed with a traceback (tens of thousands of lines) and
/health went unanswered. `capped_protocol` keeps at most `cap` connections: a new one over the
cap closes the oldest idle connection (one with no request in progress: a keep-alive that
waits, a client that never finished its headers), and when every connection is busy it is
answered 503 and closed. The cap is held under the process's descriptor limit. Repeated log
lines (uvicorn's, asyncio's) are reduced to one line per message per LOG_EVERY_S, without
tracebacks.
"""

from __future__ import annotations

import json
import logging
import resource
import time

from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("instructflow.serve.access")
LOG_EVERY_S = 10.0
# Descriptors kept for everything but client connections (model files, threads, pipes), and
# for refused connections still being answered.
RESERVED_FDS = 256
REFUSING_MAX = 64
REFUSE_WAIT_S = 2.0


def connection_cap(wanted: int) -> int:
    """`wanted`, lowered to what the descriptor limit allows (raised to its hard limit)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        soft = hard
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - RESERVED_FDS - REFUSING_MAX))


def _busy_body() -> bytes:
    message = "server busy: every connection has a request in progress (--max-connections)"
    return json.dumps({"error": {"message": message, "type": "server_error"}}).encode()


BUSY = _busy_body()
BUSY_RESPONSE = (
    b"HTTP/1.1 503 Service Unavailable\r\ncontent-type: application/json\r\n"
    b"content-length: %d\r\nconnection: close\r\n\r\n%s" % (len(BUSY), BUSY)
)


class Throttle:
    """Says whether a line with this key may be logged now (once per LOG_EVERY_S), and how
    many were held back since the last one."""

    def __init__(self) -> None:
        self.last: dict[str, float] = {}
        self.held: dict[str, int] = {}

    def __call__(self, key: str) -> int | None:
        now = time.monotonic()
        if now - self.last.get(key, -LOG_EVERY_S) < LOG_EVERY_S:
            self.held[key] = self.held.get(key, 0) + 1
            return None
        self.last[key] = now
        return self.held.pop(key, 0)


class OneLine(logging.Filter):
    """A logger's records as one line each, a repeated message at most once per LOG_EVERY_S."""

    def __init__(self) -> None:
        super().__init__()
        self.throttle = Throttle()

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage().splitlines()[0] if record.getMessage() else ""
        if record.exc_info and record.exc_info[1] is not None:
            message += f": {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        held = self.throttle(message[:80])
        if held is None:
            return False
        record.msg = message + (f" (+{held} like it)" if held else "")
        record.args, record.exc_info, record.exc_text, record.stack_info = (), None, None, None
        return True


def one_line_logs(*names: str) -> None:
    for name in names:
        logging.getLogger(name).addFilter(OneLine())


def capped_protocol(cap: int) -> type[H11Protocol]:
    """An h11 protocol class whose server keeps at most `cap` connections open."""
    opened: dict[H11Protocol, None] = {}  # open connections, oldest first
    throttle = Throttle()

    def note(key: str, line: str) -> None:
        held = throttle(key)
        if held is not None:
            log.warning(line + (f" ({held} more since the last such line)" if held else ""))

    class Capped(H11Protocol):
        refusing = False

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            opened[self] = None
            if len(opened) <= cap:
                return
            victim = next((c for c in opened if c is not self and c.idle()), None)
            if victim is not None:
                note("evict", f"{cap} connections open (--max-connections): closing idle ones")
                victim.close_idle()
                return
            note("busy", f"{cap} connections open and all busy: new ones get 503")
            if len(opened) > cap + REFUSING_MAX:
                transport.close()
                return
            self.refusing = True
            self.loop.call_later(REFUSE_WAIT_S, transport.close)

        def connection_lost(self, exc) -> None:
            opened.pop(self, None)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self.refusing:  # answered once its request has been read, so no reset
                if not self.transport.is_closing():
                    self.transport.write(BUSY_RESPONSE)
                    self.transport.close()
                return
            super().data_received(data)

        def idle(self) -> bool:
            return not self.refusing and (self.cycle is None or self.cycle.response_complete)

        def close_idle(self) -> None:
            opened.pop(self, None)
            try:
                self.timeout_keep_alive_handler()  # what uvicorn does to an expired keep-alive
            except Exception:  # h11 in a state that cannot say goodbye: just close
                self.transport.close()

    return Capped
