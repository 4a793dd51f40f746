"""A tiny raw IMAP client for tests imaplib can't express.

Sends exactly the bytes it is given and reads lines, literals and tagged
responses, with a socket timeout on every read (a protocol deadline, not a
speed assertion). Every Conn registers itself with an optional tracker so
the test runner can close it when a test times out.
"""

import re
import socket
import ssl
import time

DEFAULT_TIMEOUT = 10.0
LITERAL_AT_END = re.compile(rb"\{(\d+)\+?\}\r\n$")


class ProtocolError(AssertionError):
    pass


def client_context(cafile=None, verify=True):
    ctx = ssl.create_default_context(cafile=cafile)
    if not verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


class Conn:
    def __init__(self, host, port, tls=False, ctx=None, timeout=DEFAULT_TIMEOUT,
                 server_hostname=None, tracker=None):
        self.host, self.port = host, port
        self.timeout = timeout
        self.buf = b""
        self.transcript = []        # (direction, bytes), for diagnostics
        self.sock = socket.create_connection((host, port), timeout=timeout)
        if tracker is not None:
            tracker.append(self)
        if tls:
            self.starttls(ctx, server_hostname)

    # ------------------------------------------------------------ transport
    def starttls(self, ctx=None, server_hostname=None):
        """Start TLS on the socket. Bytes the server sent before the handshake
        and that we have not consumed would be lost: refuse that."""
        if self.buf:
            raise ProtocolError("plaintext bytes buffered before TLS: %r" % self.buf[:200])
        ctx = ctx or client_context(verify=False)
        self.sock = ctx.wrap_socket(self.sock, server_hostname=server_hostname or self.host)
        self.sock.settimeout(self.timeout)

    @property
    def tls_version(self):
        return self.sock.version() if isinstance(self.sock, ssl.SSLSocket) else None

    def settimeout(self, t):
        self.timeout = t
        self.sock.settimeout(t)

    def send(self, data):
        if isinstance(data, str):
            data = data.encode()
        self.transcript.append(("C", data[:300]))
        self.sock.sendall(data)

    def _fill(self):
        try:
            chunk = self.sock.recv(262144)
        except socket.timeout:
            raise ProtocolError("timed out after %.0fs waiting for server data; "
                                "last received: %r" % (self.timeout, self.last_received()))
        if not chunk:
            raise EOFError("connection closed by server")
        self.transcript.append(("S", chunk[:300]))
        self.buf += chunk

    def last_received(self):
        for d, b in reversed(self.transcript):
            if d == "S":
                return b
        return b""

    def readline(self):
        """One line including CRLF (EOFError on EOF before a full line)."""
        while True:
            i = self.buf.find(b"\n")
            if i >= 0:
                line, self.buf = self.buf[:i + 1], self.buf[i + 1:]
                return line
            self._fill()

    def read_exact(self, n):
        if len(self.buf) < n:
            # Large literals: gather chunks in a list, join once.
            parts, have = [self.buf], len(self.buf)
            self.buf = b""
            while have < n:
                self._fill()
                parts.append(self.buf)
                have += len(self.buf)
                self.buf = b""
            self.buf = b"".join(parts)
        data, self.buf = self.buf[:n], self.buf[n:]
        return data

    def read_response(self):
        """One response: a line, with any literals it announces read in and
        the line continued after them. Returns (line_bytes, [literals])."""
        parts, literals = [], []
        while True:
            line = self.readline()
            parts.append(line)
            m = LITERAL_AT_END.search(line)
            if not m:
                return b"".join(parts), literals
            lit = self.read_exact(int(m.group(1)))
            literals.append(lit)
            parts.append(lit)

    def wait_tagged(self, tag):
        """Read until the tagged response for tag. Returns (tagged_line,
        [untagged/continuation lines before it], [literals])."""
        if isinstance(tag, str):
            tag = tag.encode()
        others, lits = [], []
        while True:
            line, ls = self.read_response()
            lits += ls
            if line.startswith(tag + b" "):
                return line, others, lits
            others.append(line)

    def command(self, tag, cmd):
        """Send 'tag cmd\\r\\n', return the tagged line and untagged lines."""
        if isinstance(cmd, str):
            cmd = cmd.encode()
        if isinstance(tag, str):
            tag = tag.encode()
        self.send(tag + b" " + cmd + b"\r\n")
        return self.wait_tagged(tag)

    def expect_ok(self, tag, cmd):
        tagged, untagged, lits = self.command(tag, cmd)
        status(tagged, "OK")
        return tagged, untagged, lits

    def wait_continuation(self):
        """Read until a '+' line; untagged lines before it are returned."""
        seen = []
        while True:
            line, _ = self.read_response()
            if line.startswith(b"+"):
                return line, seen
            if not line.startswith(b"*"):
                raise ProtocolError("expected '+', got %r" % line[:300])
            seen.append(line)

    def read_until_eof(self, timeout=DEFAULT_TIMEOUT):
        """Everything the server sends until it closes; ProtocolError if it
        doesn't close within timeout."""
        end = time.monotonic() + timeout
        data = self.buf
        self.buf = b""
        while True:
            left = end - time.monotonic()
            if left <= 0:
                raise ProtocolError("server did not close within %.0fs; got %r"
                                    % (timeout, data[-300:]))
            self.sock.settimeout(left)
            try:
                chunk = self.sock.recv(65536)
            except socket.timeout:
                continue
            except (ConnectionResetError, BrokenPipeError):
                return data
            except ssl.SSLError as e:
                # A peer that closes without close_notify: still a close.
                if "EOF" in str(e) or "UNEXPECTED_EOF" in str(e):
                    return data
                raise
            if not chunk:
                return data
            self.transcript.append(("S", chunk[:300]))
            data += chunk

    def login(self, user, password, tag="L1"):
        return self.expect_ok(tag, b"LOGIN " + quote(user) + b" " + quote(password))

    def close(self):
        close_socket(self.sock)

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def close_socket(sock):
    """shutdown() first: it also wakes a thread blocked in recv() on this
    socket (the runner closes connections of a test that overran)."""
    try:
        socket.socket.shutdown(sock, socket.SHUT_RDWR)
    except (OSError, ValueError):
        pass
    try:
        sock.close()
    except OSError:
        pass


def quote(s):
    if isinstance(s, str):
        s = s.encode()
    return b'"' + s.replace(b"\\", b"\\\\").replace(b'"', b'\\"') + b'"'


def status(tagged, want):
    """Assert the tagged response's status is want (OK/NO/BAD)."""
    parts = tagged.split(b" ", 2)
    if len(parts) < 2 or parts[1].upper() != want.encode():
        raise ProtocolError("expected %s, got %r" % (want, tagged[:300]))
    return tagged


def capabilities(line):
    """Set of capability atoms (upper case) from '* CAPABILITY ...' or from a
    '[CAPABILITY ...]' response code anywhere in the line."""
    if isinstance(line, bytes):
        line = line.decode("latin-1")
    m = re.search(r"\[CAPABILITY ([^\]]*)\]", line, re.I)
    if m:
        text = m.group(1)
    else:
        m = re.match(r"\* CAPABILITY (.*)", line.strip(), re.I)
        if not m:
            return None
        text = m.group(1)
    return set(t.upper() for t in text.split())


def greeting_text(line):
    """'* OK [CODE ...] text' -> 'text'."""
    if isinstance(line, bytes):
        line = line.decode("latin-1")
    line = line.rstrip("\r\n")
    m = re.match(r"\* (OK|PREAUTH|BYE) (?:\[[^\]]*\] ?)?(.*)$", line, re.I)
    return m.group(2) if m else None
