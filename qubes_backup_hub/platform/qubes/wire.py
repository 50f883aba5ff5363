"""The qubesd socket wire protocol: one request per connection, the whole response, parsed.

This is what dom0 tools speak to `/var/run/qubesd.sock` on Qubes 4.1 and later (checked against
qubes-core-admin `qubes/api/__init__.py` QubesDaemonProtocol and qubes-core-admin-client
`qubesadmin/app.py` QubesLocal.qubesd_call / `qubesadmin/base.py` _parse_qubesd_response):

Request (client -> qubesd), then the client shuts down its write side (EOF ends the request)::

    METHOD+ARG SP SOURCE SP "name" SP DEST NUL PAYLOAD

e.g. ``admin.vm.property.Get+label dom0 name work\\0`` (the `+` is sent even when ARG is empty).
This is the qrexec service header, so qubesd can also sit behind qrexec as a socket service;
before Qubes 4.1 the framing was ``SRC\\0METHOD\\0DEST\\0ARG\\0PAYLOAD``, which 4.1+ rejects.
qubesd reads at most 64 KiB per request and drops the connection on anything longer, so bulk
data (volume import) never goes over this socket (see `importer.py`).

Response (qubesd -> client), then qubesd closes the connection::

    "0" NUL DATA                                   success
    "2" NUL EXC_TYPE NUL TRACEBACK NUL MESSAGE NUL   a Qubes exception (traceback empty
                                                     unless qubesd runs with --debug)
    "1" NUL ...                                    events (admin.Events only; refused here)

A request qubesd refuses outright (unknown method, malformed argument, permission denied: its
ProtocolError and PermissionDenied) gets no answer at all: the connection is closed empty.

Everything read back is bounded: the response is size-capped while it is read, and exception
fields are shown with non-printable characters escaped.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from ...errors import QbhubError

DEFAULT_SOCKET = "/var/run/qubesd.sock"
MAX_REQUEST = 65536  # qubesd's own buffer size; longer requests are dropped by qubesd
MAX_RESPONSE = 16 * 1024 * 1024
DEFAULT_TIMEOUT = 120.0
SOURCE = "dom0"

METHOD = re.compile(r"(admin|internal)\.[A-Za-z0-9_.]{1,120}")
# Arguments are qrexec service arguments: qrexec itself allows only these characters.
ARG = re.compile(r"[A-Za-z0-9_.:+@-]{0,250}")
DEST = re.compile(r"[A-Za-z0-9_.@:-]{1,64}")


class QubesApiError(QbhubError):
    """An Admin API call failed: qubesd raised an exception, refused, or answered garbage.

    `exc_type` is the Qubes exception class name ("QubesVMNotFoundError", ...) when qubesd sent
    one, else a short tag of our own ("NoResponse", "Malformed", "Connection").
    """

    exit_code = 1

    def __init__(self, call: str, exc_type: str, message: str) -> None:
        self.call = call
        self.exc_type = exc_type
        self.message = message
        super().__init__(f"Qubes Admin API {call}: {exc_type}: {message}")


def shown(raw: bytes, limit: int = 300) -> str:
    """Untrusted bytes as a bounded, printable string."""
    text = raw[:limit].decode("utf-8", errors="replace")
    text = "".join(c if c.isprintable() else f"\\x{ord(c):02x}" for c in text)
    return text + ("..." if len(raw) > limit else "")


def describe(method: str, dest: str, arg: str) -> str:
    return f"{method}{'+' + arg if arg else ''} on {dest}"


def encode_request(method: str, dest: str, arg: str = "", payload: bytes = b"") -> bytes:
    """The request bytes for one call; refuses anything qubesd would misparse."""
    if not METHOD.fullmatch(method):
        raise QubesApiError(describe(method, dest, arg), "BadRequest", "invalid method name")
    if not ARG.fullmatch(arg):
        raise QubesApiError(describe(method, dest, ""), "BadRequest", f"invalid argument {arg!r}")
    if not DEST.fullmatch(dest) or dest in (".", ".."):
        raise QubesApiError(method, "BadRequest", f"invalid destination {shown(dest.encode())}")
    header = f"{method}+{arg} {SOURCE} name {dest}\0".encode("ascii")
    request = header + payload
    if len(request) > MAX_REQUEST:
        raise QubesApiError(
            describe(method, dest, arg),
            "BadRequest",
            f"request of {len(request)} bytes exceeds qubesd's {MAX_REQUEST}-byte limit",
        )
    return request


def parse_response(call: str, data: bytes) -> bytes:
    """The payload of a success response, or QubesApiError for anything else."""
    if data == b"":
        raise QubesApiError(
            call,
            "NoResponse",
            "qubesd closed the connection without an answer (unknown method, invalid argument "
            "or permission denied; see `journalctl -u qubesd` in dom0)",
        )
    if data.startswith(b"0\0"):
        return data[2:]
    if data.startswith(b"2\0"):
        fields = data[2:].split(b"\0")
        # EXC_TYPE, TRACEBACK, MESSAGE and the empty tail after the final NUL
        if len(fields) != 4 or fields[3] != b"":
            raise QubesApiError(call, "Malformed", f"bad exception frame {shown(data, 120)}")
        exc_type = fields[0]
        if not re.fullmatch(rb"[A-Za-z_][A-Za-z0-9_]{0,80}", exc_type):
            raise QubesApiError(call, "Malformed", f"bad exception type {shown(exc_type, 80)}")
        return _raise(call, exc_type.decode("ascii"), shown(fields[2]))
    if data.startswith(b"1\0"):
        raise QubesApiError(call, "Malformed", "unexpected event stream")
    raise QubesApiError(call, "Malformed", f"unknown response header {shown(data[:16])}")


def _raise(call: str, exc_type: str, message: str) -> bytes:
    raise QubesApiError(call, exc_type, message or "(no message)")


@dataclass(frozen=True)
class QubesdSocket:
    """A connection factory for one qubesd socket; every call is its own connection."""

    path: str = DEFAULT_SOCKET
    timeout: float = DEFAULT_TIMEOUT
    max_response: int = MAX_RESPONSE

    def call(self, method: str, dest: str, arg: str = "", payload: bytes = b"") -> bytes:
        """Send one request and return the success payload (QubesApiError otherwise)."""
        call = describe(method, dest, arg)
        request = encode_request(method, dest, arg, payload)
        return parse_response(call, self._exchange(call, request))

    def _exchange(self, call: str, request: bytes) -> bytes:
        chunks: list[bytes] = []
        total = 0
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(self.timeout)
                sock.connect(self.path)
                sock.sendall(request)
                sock.shutdown(socket.SHUT_WR)
                while True:
                    try:
                        chunk = sock.recv(65536)
                    except ConnectionResetError:  # qubesd aborts refused requests
                        break
                    if not chunk:
                        break
                    total += len(chunk)
                    if total > self.max_response:
                        raise QubesApiError(
                            call, "Malformed", f"response exceeds {self.max_response} bytes"
                        )
                    chunks.append(chunk)
        except QubesApiError:
            raise
        except TimeoutError:
            raise QubesApiError(call, "Connection", f"no answer within {self.timeout:g}s") from None
        except OSError as e:
            raise QubesApiError(
                call, "Connection", f"cannot talk to qubesd at {self.path}: {e.strerror or e}"
            ) from None
        return b"".join(chunks)
