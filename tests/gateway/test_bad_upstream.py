"""An upstream that misbehaves: the gateway (a real ``fhir-consent serve --upstream`` process,
its real ``aiohttp`` pool) answers each failure with its own 502/503/504 OperationOutcome,
never a 500, and never passes on a byte of what the upstream sent.

The bad upstream is a raw TCP server in a thread that answers each request by the id it
asks for: a 500 with a "stack trace", a 200 that is not JSON, a 200 holding another resource,
bytes that are not HTTP, a body cut short, an answer that never comes, a closed connection.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import httpx
import pytest

from .conftest import World
from .gwkit import PATIENT_A, bearer, serve

SECRET = "secret-upstream-detail"


def _http(status: str, ctype: str, body: bytes, length: int | None = None) -> bytes:
    size = len(body) if length is None else length
    head = f"HTTP/1.1 {status}\r\ncontent-type: {ctype}\r\ncontent-length: {size}\r\n\r\n"
    return head.encode() + body


_FHIR = "application/fhir+json"
#: id -> (the raw answer, None to never answer, b"" to close; our status; the outcome's code)
CASES: dict[str, tuple[bytes | None, int, str]] = {
    "boom": (_http("500 Oops", "text/plain", f"Traceback: {SECRET}".encode()), 502, "exception"),
    "notjson": (_http("200 OK", "text/html", f"<p>{SECRET}</p>".encode()), 502, "exception"),
    "other": (
        _http("200 OK", _FHIR, f'{{"resourceType":"DocumentReference","id":"{SECRET}"}}'.encode()),
        502,
        "exception",
    ),
    "garbage": (b"\x00\x01 " + SECRET.encode() + b"\r\n\r\n", 502, "exception"),
    "truncated": (
        _http(
            "200 OK",
            _FHIR,
            f'{{"resourceType":"DocumentReference","id":"truncated","x":"{SECRET}'.encode(),
            500,
        ),
        502,
        "exception",
    ),
    "hang": (None, 504, "timeout"),
    "closed": (b"", 503, "transient"),
}


class BadUpstream:
    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.stopped = threading.Event()
        self.seen: list[str] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.stopped.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn:
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                data += chunk
            path = data.split(b" ", 2)[1].decode()
            rid = path.rstrip("/").rsplit("/", 1)[-1]
            self.seen.append(rid)
            answer = CASES.get(rid, (b"", 0, ""))[0]
            if answer is None:
                self.stopped.wait(10)  # never answers (the gateway times out first)
                return
            conn.sendall(answer)

    def stop(self) -> None:
        self.stopped.set()
        self.sock.close()


@pytest.fixture()
def bad(world: World) -> Iterator[tuple[BadUpstream, str]]:
    upstream = BadUpstream()
    gateway = serve(
        ["--upstream", f"http://127.0.0.1:{upstream.port}/fhir", "--database-url", world.store_url],
        {"FHIR_CONSENT_SMART_KEYS_DIR": str(world.keys), "FHIR_CONSENT_GATEWAY_TIMEOUT": "1"},
        world.root / "gateway-bad",
        name="gateway-bad",
    )
    try:
        yield upstream, gateway.origin
    finally:
        gateway.stop()
        upstream.stop()


def test_bad_upstream_answers_are_our_own_errors(
    world: World, http: httpx.Client, bad: tuple[BadUpstream, str]
) -> None:
    upstream, origin = bad
    token = world.clinic_a.token(http, f"{origin}/auth/token")
    world.clinic_a._token = None  # that token is for this gateway's base only
    for rid, (_answer, status, code) in CASES.items():
        r = http.get(f"{origin}/fhir/DocumentReference/{rid}", headers=bearer(token))
        assert r.status_code == status, (rid, r.status_code, r.text)
        outcome = r.json()
        assert outcome["resourceType"] == "OperationOutcome", rid
        assert outcome["issue"][0]["code"] == code, (rid, outcome)
        assert SECRET not in r.text and "Traceback" not in r.text, rid
        assert str(upstream.port) not in r.text, rid
    # a search gets the same treatment (the connection of its first upstream page closes)
    r = http.get(
        f"{origin}/fhir/DocumentReference", params={"patient": PATIENT_A}, headers=bearer(token)
    )
    assert r.status_code == 503, r.text
    assert r.json()["resourceType"] == "OperationOutcome"
    assert set(CASES) <= set(upstream.seen)  # every case really reached the upstream
