"""
Talk to a model in a browser: a small HTTP server for `python nanochat_one.py --stage serve`.

Standard library only, and it imports nothing from nanochat_one.py: the stage hands it the
model's Engine and its conversation renderer (see `serve`), and this module does the HTTP.
`reply_pieces` turns the engine's tokens into the reply's parts as they come, for this server
and for --stage chat.

    GET  /                   chat.html, the chat page
    GET  /health             the model's name, stage and step; limits, defaults, queue and counters
    POST /chat/completions   {"messages": [...], "stream": true, "temperature": 0.6, "top_k": 50,
                             "max_tokens": 256, "seed": 1}: the shape of OpenAI's chat API, so curl
                             and existing clients work (also at /v1/chat/completions)

Streaming replies are server-sent events: one `data: {json}` chunk per piece of the reply, then
`data: [DONE]`. Each chunk's delta carries its `content` and a `part`: "text", "python" (a
calculator expression the model writes) or "python_output" (the result the tool forced in).
A whole reply (`"stream": false`) comes back with `content`, where calculator calls read
`[calculator: 12*7 = 84]`, and `parts`, the same reply as a list of {"type", "text"}: send
`parts` back as the assistant's content in the next request and the model sees its calculator
calls as it made them (a plain string is read as plain text).

One model answers one request at a time, in the order they arrived: each reply streams at the
model's full speed, and there is no scheduler to read (batching several conversations into one
forward pass would serve more of them per second, at the price of one). Up to `max_queue`
requests wait their turn; beyond that a request gets 503 "busy" with a Retry-After header at
once. A streaming client that goes away (closes the page, presses Stop, Ctrl-C on curl) stops its
generation within a token or two. A whole reply (not streamed) is generated to its end: until the
server writes to it, a client that closed cannot be told from one that only closed its sending
side (a half-close) and waits for the answer.

No client can keep the model, or the server, from the others (see Limits):
- a deadline: `timeout_seconds` to send the whole request, and again to read the rest of the
  reply once it is generated. Generation never waits for a client: what its socket cannot take
  yet waits in memory (at most max_new_tokens pieces), so a slow reader delays only itself.
- `max_connections` at once, each a thread. At the limit, a new connection closes the oldest one
  whose request has not arrived; if every one is being answered, the new one gets 503.
- a body over `max_body_bytes` gets 413, and is read to its end first (up to twice the limit) so
  that a client still sending it reads the answer; absurd numbers, deep nesting or a bad
  Content-Length get a 400 that says what is wrong.
- it answers to the names it listens on: a request whose Host header names another (a web site
  that points its own name at this machine, "DNS rebinding") or that another site's page sent
  (its Origin header) gets 403; `allowed_hosts` (--allow-host) adds names, as behind a proxy.
It listens on 127.0.0.1, this machine only, unless told otherwise, and has no login and no
encryption: anyone who can connect can use the model.
"""
import codecs
import io
import ipaddress
import itertools
import json
import math
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

PAGE = Path(__file__).resolve().parent / "chat.html"
PART_TYPES = ("text", "python", "python_output")
MAX_DIGITS = 20  # the longest integer a request may hold (a seed, at most 2**63 - 1, has 19 digits)
# control characters (C0, DEL, C1) as the log writes them, so a request line cannot move the cursor or forge a line
LOG_ESCAPES = {code: f"\\x{code:02x}" for code in [*range(0x20), *range(0x7f, 0xa0)]}


@dataclass
class Limits:
    max_messages: int = 32  # messages per request
    max_message_chars: int = 4000  # characters per message
    max_new_tokens: int = 256  # the largest max_tokens a request may ask for
    max_queue: int = 32  # requests waiting while one is served; more get 503
    max_body_bytes: int = 1 << 20
    max_connections: int = 64  # open at once (a thread each); at the limit the oldest still silent one is closed
    timeout_seconds: float = 30.0  # to send the request, and again to read the rest of the reply once generated


class RequestError(Exception):
    """A request the server will not serve: answered with `status` and this message as JSON."""

    def __init__(self, message, status=400, kind="invalid_request_error"):
        super().__init__(message)
        self.status, self.kind = status, kind


class TurnQueue:
    """One request at a time, first come first served, with at most `size` waiting.

    Each request takes a ticket; ticket n is served once the n requests before it have left.
    `waiting` counts the requests holding a ticket that are not being served."""

    def __init__(self, size):
        self.size, self.next_ticket, self.now_serving = size, 0, 0
        self.condition = threading.Condition()

    @property
    def waiting(self):
        return max(0, self.next_ticket - self.now_serving - 1)

    def enter(self):
        """Wait for our turn; False (at once) when the queue is full."""
        with self.condition:
            if self.next_ticket - self.now_serving > self.size:  # one served + `size` waiting
                return False
            ticket, self.next_ticket = self.next_ticket, self.next_ticket + 1
            self.condition.wait_for(lambda: self.now_serving == ticket)
            return True

    def leave(self):
        with self.condition:
            self.now_serving += 1
            self.condition.notify_all()


def check_messages(messages, limits):
    """Raise RequestError unless `messages` is a list of {"role", "content"} within the limits.
    (Which roles may follow which is the model's renderer's to say.)"""
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role", "content"} objects')
    if len(messages) > limits.max_messages:
        raise RequestError(f"{len(messages)} messages; this server takes at most {limits.max_messages}: start a new chat")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant"):
            raise RequestError(f'message {i} must be an object with "role" system, user or assistant and a "content"')
        content = message.get("content")
        if message["role"] == "assistant" and isinstance(content, list):  # content parts, as `parts` in a reply
            if not all(isinstance(p, dict) and p.get("type") in PART_TYPES and isinstance(p.get("text"), str) for p in content):
                raise RequestError(f'message {i}: each content part must be {{"type": one of {", ".join(PART_TYPES)}, "text": a string}}')
            size = sum(len(p["text"]) for p in content)
        elif isinstance(content, str):
            size = len(content)
        else:
            raise RequestError(f'message {i}: "content" must be a string (or, for the assistant, a list of parts)')
        if size > limits.max_message_chars:
            raise RequestError(f"message {i} has {size} characters; this server takes at most {limits.max_message_chars}")
    if messages[-1]["role"] != "user":
        raise RequestError("the last message must be the user's: the model answers it")


def shorten(text, width=40):
    """A client's text cut for an error message: shorten("9" * 400, 8) -> "99999..."."""
    return text if len(text) <= width else text[:width - 3] + "..."


def parse_integer(digits):
    """An integer of the request's JSON (json.loads's parse_int). Python's int() refuses more than
    4,300 digits with an error of its own, and a number with more than a few could not be a setting."""
    if len(digits) > MAX_DIGITS:
        raise RequestError(f"the body holds a number {len(digits):,} digits long; numbers here have at most "
                           f"{MAX_DIGITS}")
    return int(digits)


def host_name(netloc):
    """The host in a Host header or an origin's "host:port", lowercase and without the port:
    "LocalHost:8000" -> "localhost", "[::1]:8000" -> "::1"; "" when there is none to read."""
    try:
        return urlsplit("//" + netloc).hostname or ""
    except ValueError:  # "[", a port that is not a number, ...
        return ""


def number(body, name, default, kind, low, high):
    """body[name] as `kind` within [low, high], or `default` when absent or null."""
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or (kind is int and value != int(value)) or not low <= value <= high:
        raise RequestError(f'"{name}" must be {"an integer" if kind is int else "a number"} from {low} to {high}, got {value!r}')
    return kind(value)


def add_piece(parts, text, part):
    """Append a piece of a reply to its content parts, joining consecutive pieces of one type."""
    if parts and parts[-1]["type"] == part:
        parts[-1]["text"] += text
    elif text:
        parts.append(dict(type=part, text=text))


def display(parts):
    """The reply as one string, each calculator call written [calculator: 12*7 = 84]."""
    forms = dict(text="{}", python="[calculator: {}", python_output=" = {}]")
    return "".join(forms[p["type"]].format(p["text"]) for p in parts)


def reply_pieces(engine, prompt, max_tokens, temperature=0.6, top_k=None, seed=42):
    """The assistant's reply to a prompt (render_for_completion), one (text, part) pair per token:
    part is "text", "python" (a calculator expression the model writes) or "python_output" (the
    tool's result, forced in), the part types of render_conversation. The special tokens around a
    part carry no text, and a character split across tokens comes whole with its last token.
    Ends before the stop token, or after max_tokens."""
    s = engine.tokenizer.special_tokens
    next_part = {s["<|python_start|>"]: "python", s["<|python_end|>"]: "text",
                 s["<|output_start|>"]: "python_output", s["<|output_end|>"]: "text"}
    decoder, part = codecs.getincrementaldecoder("utf-8")(errors="replace"), "text"
    for (token,), _ in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed=seed):
        if token in engine.stop_tokens:
            return
        if token in next_part:
            yield decoder.decode(b"", final=True), part
            part = next_part[token]
        else:
            yield decoder.decode(engine.tokenizer.token_to_bytes(token)), part


class ClientFile(io.RawIOBase):
    """The client's socket as a file whose reads and writes give up (TimeoutError) at one deadline,
    `timeout` seconds after the last restart(): a client that trickles its request in, or its reply
    out, a byte at a time cannot hold the connection longer than that. (A socket's own timeout counts
    each operation afresh, so a client that sends or reads a byte a minute never reaches it.)

    While `eager` is set, writes never wait: what the socket cannot take now stays in `pending`, for a
    later write or flush. The handler sets it while it holds the model, so that a client that reads
    slowly holds up nobody else."""

    def __init__(self, sock, timeout):
        self.sock, self.timeout, self.pending, self.eager = sock, timeout, bytearray(), False
        self.restart()

    def restart(self):
        self.deadline = time.monotonic() + self.timeout

    def wait(self):
        """Let the next socket operation wait until the deadline, and no longer."""
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError(f"the client took more than its {self.timeout:g} seconds")
        self.sock.settimeout(left)

    def readable(self):
        return True

    def writable(self):
        return True

    def readinto(self, buffer):
        self.wait()
        return self.sock.recv_into(buffer)

    def write(self, data):
        self.pending += data
        self.flush()
        return len(data)

    def flush(self):
        if self.eager:
            self.sock.settimeout(0)  # non-blocking: send what fits now
            try:
                del self.pending[:self.sock.send(self.pending)]
            except BlockingIOError:
                pass
        elif self.pending:
            try:
                self.wait()
                self.sock.sendall(self.pending)  # with a timeout, sendall's limit is for all of it
            finally:
                self.pending.clear()  # sent, or the connection is done for


class ChatHandler(BaseHTTPRequestHandler):
    server_version = "nanochat-one"

    def setup(self):
        self.connection = self.request
        self.wfile = ClientFile(self.connection, self.server.limits.timeout_seconds)
        self.rfile = io.BufferedReader(self.wfile)
        self.unread = 0  # bytes of the body still on the wire when an answer goes out before it is read

    def handle(self):
        try:
            super().handle()
        except (ConnectionError, TimeoutError):  # the client left, ran out of time, or was closed to make room
            self.close_connection = True

    def do_GET(self):
        self.server.settle(self.connection)
        try:
            self.check_origin()
            path = self.path.partition("?")[0]
            if path in ("/", "/index.html"):
                self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path == "/health":
                server = self.server
                queue = server.queue
                self.send_json(200, dict(status="ok", **server.info, busy=queue.next_ticket > queue.now_serving,
                                         waiting=queue.waiting, connections=len(server.connections),
                                         limits=asdict(server.limits), **server.counts))
            else:
                raise RequestError(f"nothing at {shorten(self.path)}; the page is at / and the API at "
                                   "POST /chat/completions", 404)
        except RequestError as e:
            self.send_error_json(e)

    def do_POST(self):
        limits = self.server.limits
        try:
            length = self.body_length()
            self.unread = min(length, 2 * limits.max_body_bytes)  # what an early answer reads first (send_error_json)
            self.check_origin()
            if self.path.partition("?")[0] not in ("/chat/completions", "/v1/chat/completions"):
                raise RequestError(f"nothing at {shorten(self.path)}; POST to /chat/completions", 404)
            if length > limits.max_body_bytes:
                raise RequestError(f"the body is {length} bytes; this server takes at most {limits.max_body_bytes}",
                                   413)
            request = self.read_request(length)
            self.server.settle(self.connection)
            self.answer(request)
        except RequestError as e:
            self.send_error_json(e)

    def body_length(self):
        """The Content-Length header, a number of bytes; RequestError unless it is one."""
        length = self.headers.get("Content-Length")
        if length is None:
            raise RequestError("send the JSON body with a Content-Length header", 411)
        if not (length.isascii() and length.isdigit()):  # "²".isdigit() is true, and int() refuses it
            raise RequestError(f"Content-Length must be a number of bytes, got {shorten(length)!r}")
        if len(length) > MAX_DIGITS:
            raise RequestError(f"the body is {shorten(length)} bytes; this server takes at most "
                               f"{self.server.limits.max_body_bytes}", 413)
        return int(length)

    def check_origin(self):
        """403 unless the Host header names this server (ChatServer.answers_to) and a request from a web
        page (it has an Origin header) comes from this server's own page, or from a host allowed by name.
        A browser sets both headers itself: another site's page can send a request here without asking
        (a form-like POST needs no permission), and a site that points its own name at 127.0.0.1 can
        even read the replies, but neither can pass this. (A request without a Host header, which no
        browser sends, is answered.)"""
        host, origin = self.headers.get("Host"), self.headers.get("Origin")
        if host is not None and not self.server.answers_to(host_name(host)):
            raise RequestError(f"this server does not answer to the name {shorten(host)!r}; if it should, start it "
                               f"with --allow-host {host_name(host) or 'NAME'}", 403, "forbidden")
        if origin is not None:
            scheme, _, netloc = origin.partition("://")
            own_page = host is not None and scheme in ("http", "https") and netloc.lower() == host.lower()
            if not own_page and host_name(netloc) not in self.server.allowed_hosts:
                raise RequestError(f"a page from {shorten(origin)!r} may not use this server; if it should, start it "
                                   f"with --allow-host {host_name(netloc) or 'NAME'}", 403, "forbidden")

    def read_request(self, length):
        """The request's JSON body, checked: (messages, settings)."""
        limits = self.server.limits
        data = self.rfile.read(length)
        self.unread = 0
        try:
            body = json.loads(data, parse_int=parse_integer)
        except RecursionError:
            raise RequestError("the body's JSON is nested too deeply") from None
        except ValueError as e:  # including UnicodeDecodeError and json.JSONDecodeError
            raise RequestError(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError('the body must be a JSON object with "messages"')
        check_messages(body.get("messages"), limits)
        defaults = self.server.info["defaults"]
        settings = dict(temperature=number(body, "temperature", defaults["temperature"], float, 0.0, 2.0),
                        top_k=number(body, "top_k", defaults["top_k"], int, 1, 1 << 20),
                        max_tokens=number(body, "max_tokens", defaults["max_tokens"], int, 1, limits.max_new_tokens),
                        seed=number(body, "seed", None, int, 0, 2 ** 63 - 1))
        if not isinstance(body.get("stream", False), bool):
            raise RequestError('"stream" must be true or false')
        return body["messages"], settings | dict(stream=body.get("stream", False))

    def answer(self, request):
        messages, settings = request
        server = self.server
        try:
            prompt = server.render(messages)
        except ValueError as e:  # roles out of order, ...: the renderer's own words
            raise RequestError(str(e)) from None
        room = server.info["context"] - len(prompt)
        if room < 1:
            raise RequestError(f"the conversation is {len(prompt)} tokens and this model reads at most "
                               f"{server.info['context']}: start a new chat")
        if not server.queue.enter():
            server.count("rejected")
            raise RequestError(f"busy: {server.limits.max_queue} requests are already waiting; try again shortly", 503, "busy")
        self.wfile.eager = True  # the model is ours now: writing must not wait for the client
        try:
            max_tokens = min(settings["max_tokens"], room)
            seed = settings["seed"] if settings["seed"] is not None else secrets.randbits(32)
            pieces = reply_pieces(server.engine, prompt, max_tokens, settings["temperature"], settings["top_k"], seed)
            generated = (self.stream if settings["stream"] else self.whole)(pieces, len(prompt), max_tokens)
        finally:
            self.wfile.eager = False
            self.wfile.restart()  # the model is free for the next request; the client has its time again for the rest
            server.queue.leave()
        if generated:
            try:
                self.wfile.flush()  # what the client has not taken yet, by its deadline
            except (ConnectionError, TimeoutError) as e:
                server.log(f"client did not take all of its reply ({e}); connection closed")

    def chunk(self, delta, finish_reason=None, **extra):
        return dict(id=self.reply_id, object="chat.completion.chunk", created=self.created, model=self.server.info["model"],
                    choices=[dict(index=0, delta=delta, finish_reason=finish_reason)], **extra)

    def stream(self, pieces, prompt_tokens, max_tokens):
        """Send the reply as server-sent events, one chunk per piece, as it is generated; False if the
        client went away (a write fails once it has closed: a half-closed client still reads)."""
        self.reply_id, self.created = f"chatcmpl-{next(self.server.ids)}", int(time.time())
        self.close_connection = True  # the end of the stream is the end of the connection

        def event(data):
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        tokens = 0
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            event(self.chunk(dict(role="assistant")))
            for text, part in pieces:
                tokens += 1
                self.server.count("generated_tokens")
                if text:
                    event(self.chunk(dict(content=text, part=part)))
        except ConnectionError:
            self.server.count("cancelled")
            self.server.log(f"client went away after {tokens} tokens; generation stopped")
            return False
        except Exception as e:  # the model failed: say so in the stream (the status line is already sent)
            event(dict(error=dict(message=f"generation failed: {type(e).__name__}: {e}", type="server_error")))
            raise
        self.server.count("served")
        usage = dict(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens)
        event(self.chunk({}, "length" if tokens == max_tokens else "stop", usage=usage))
        self.wfile.write(b"data: [DONE]\n\n")
        return True

    def whole(self, pieces, prompt_tokens, max_tokens):
        """Generate the whole reply, then send it as one JSON object. (Nothing is written until then, so
        a client that closed cannot be told from a half-closed one that waits: the reply runs to its end.)"""
        parts, tokens = [], 0
        try:
            for text, part in pieces:
                tokens += 1
                self.server.count("generated_tokens")
                add_piece(parts, text, part)
        except Exception as e:
            self.server.log(f"generation failed: {type(e).__name__}: {e}")
            raise RequestError(f"generation failed: {type(e).__name__}: {e}", 500, "server_error") from None
        self.server.count("served")
        self.send_json(200, dict(
            id=f"chatcmpl-{next(self.server.ids)}", object="chat.completion", created=int(time.time()),
            model=self.server.info["model"],
            choices=[dict(index=0, message=dict(role="assistant", content=display(parts), parts=parts),
                          finish_reason="length" if tokens == max_tokens else "stop")],
            usage=dict(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens)))
        return True

    def send(self, status, body, content_type, headers=()):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status, data, headers=()):
        self.send(status, json.dumps(data).encode(), "application/json", headers)

    def send_error_json(self, error):
        self.close_connection = True
        headers = [("Retry-After", "2")] if error.status == 503 else []
        self.send_json(error.status, dict(error=dict(message=str(error), type=error.kind)), headers)
        if self.unread:
            # The client may still be sending the body, and read the answer only after: closing now, with its
            # bytes unread, would reset the connection under it (a broken pipe, not this answer). So end the
            # answer, then read and drop the rest of the body: at most twice max_body_bytes, by the deadline.
            try:
                self.connection.shutdown(socket.SHUT_WR)
            except OSError:  # the client has reset the connection: nothing to wait for
                return
            while self.unread > 0 and (data := self.rfile.read1(min(self.unread, 1 << 16))):
                self.unread -= len(data)

    def log_message(self, format, *args):
        self.server.log(f"{self.address_string()} {format % args}".translate(LOG_ESCAPES))


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection, at most max_connections; the TurnQueue lets one
    generate at a time."""
    daemon_threads = True
    request_queue_size = 128  # connections the OS holds before they are accepted (the default 5 resets a burst of clients)

    def __init__(self, address, engine, render, info, limits, log=print, allowed_hosts=()):
        super().__init__(address, ChatHandler)
        self.engine, self.render, self.info, self.limits, self.log = engine, render, info, limits, log
        self.queue = TurnQueue(limits.max_queue)
        self.counts = dict(served=0, cancelled=0, rejected=0, generated_tokens=0)
        self.ids = itertools.count(1)
        self.count_lock = threading.Lock()
        # the open connections, oldest first, each True until its request has arrived (it may be closed to make room)
        self.connections, self.connections_lock = {}, threading.Lock()
        listening = ipaddress.ip_address(self.server_address[0])
        self.allowed_hosts = {host_name(name) for name in allowed_hosts} - {""}
        self.any_address = listening.is_unspecified  # 0.0.0.0: every address of this machine
        self.host_names = {host_name(address[0]), str(listening), *self.allowed_hosts} - {""}
        if listening.is_loopback or listening.is_unspecified:
            self.host_names.add("localhost")

    def answers_to(self, name):
        """Whether a Host header's name is this server's: the address it listens on, "localhost" when that is
        this machine, any IP address when it listens on all of them, or a name allowed with allowed_hosts.
        Never a site's own name (unless allowed), which a site can point at this machine."""
        if name in self.host_names:
            return True
        try:
            return self.any_address and bool(ipaddress.ip_address(name))
        except ValueError:
            return False

    def process_request(self, request, client_address):
        """Take a new connection, within max_connections: at the limit, close the oldest one whose request has
        not arrived yet (a client that connects and sends nothing takes a thread until its deadline), and if
        every one is being answered, turn the new one away with 503."""
        refused = False
        with self.connections_lock:
            if len(self.connections) >= self.limits.max_connections:
                idle = next((connection for connection, waiting in self.connections.items() if waiting), None)
                if idle is None:
                    refused = True
                else:
                    del self.connections[idle]
                    try:
                        idle.shutdown(socket.SHUT_RDWR)  # its thread's read returns nothing: it ends there
                    except OSError:  # the client is already gone
                        pass
            if not refused:
                self.connections[request] = True
        if refused:
            self.count("rejected")
            body = json.dumps(dict(error=dict(message="busy: too many connections; try again shortly", type="busy")))
            request.setblocking(False)
            try:
                request.send(f"HTTP/1.0 503 Service Unavailable\r\nRetry-After: 2\r\nContent-Type: application/json\r\n"
                             f"Content-Length: {len(body)}\r\n\r\n{body}".encode())
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def settle(self, connection):
        """The connection's request has arrived: it is no longer one to close to make room."""
        with self.connections_lock:
            if connection in self.connections:
                self.connections[connection] = False

    def shutdown_request(self, request):
        with self.connections_lock:
            self.connections.pop(request, None)
        super().shutdown_request(request)

    def count(self, name, n=1):
        with self.count_lock:
            self.counts[name] += n


def serve(engine, render, info, host="127.0.0.1", port=8000, limits=Limits(), log=print, allowed_hosts=()):
    """Serve the model behind `engine` until Ctrl-C. `render(messages)` turns a conversation into
    the prompt's token ids (ValueError if it cannot). `info` is shown by /health and the page: at
    least "model", "context" (the most tokens a prompt and its reply may hold) and "defaults"
    (temperature, top_k, max_tokens). `allowed_hosts`: more names for the Host and Origin headers
    than the address it listens on (ChatHandler.check_origin)."""
    try:
        server = ChatServer((host, port), engine, render, info, limits, log, allowed_hosts)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None
    host, port = server.server_address[:2]
    log(f"serving the {info.get('stage', '')} model {info['model']} at http://{host}:{port}/ (Ctrl-C stops); "
        f"one request at a time, up to {limits.max_queue} waiting")
    names = sorted(server.host_names) + (["any IP address"] if server.any_address else [])
    log(f"it answers requests for {', '.join(names)}; --allow-host adds a name (as behind a proxy)")
    if host in ("127.0.0.1", "localhost", "::1"):
        log("only this machine can connect; --host 0.0.0.0 opens it to the network (no authentication: use a network "
            "you trust, an SSH tunnel or a reverse proxy)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
