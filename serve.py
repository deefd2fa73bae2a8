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
requests wait their turn; beyond that a request gets 503 "busy" with a Retry-After header at once. A client that
goes away (closes the page, presses Stop, Ctrl-C on curl) stops its generation at the next token.
The server listens on 127.0.0.1, this machine only, unless told otherwise.
"""
import codecs
import itertools
import json
import math
import secrets
import select
import socket
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

PAGE = Path(__file__).resolve().parent / "chat.html"
PART_TYPES = ("text", "python", "python_output")


@dataclass
class Limits:
    max_messages: int = 32  # messages per request
    max_message_chars: int = 4000  # characters per message
    max_new_tokens: int = 256  # the largest max_tokens a request may ask for
    max_queue: int = 32  # requests waiting while one is served; more get 503
    max_body_bytes: int = 1 << 20


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


def client_gone(connection):
    """True once the client has closed its end of the connection: the socket reads as ready,
    with nothing to read."""
    try:
        ready, _, _ = select.select([connection], [], [], 0)
        return bool(ready) and not connection.recv(1, socket.MSG_PEEK)
    except OSError:
        return True


class ChatHandler(BaseHTTPRequestHandler):
    server_version = "nanochat-one"
    timeout = 60  # seconds a client may take to send its request or to read the next chunk

    def do_GET(self):
        path = urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
        elif path == "/health":
            server = self.server
            self.send_json(200, dict(status="ok", **server.info, busy=server.queue.next_ticket > server.queue.now_serving,
                                     waiting=server.queue.waiting, limits=asdict(server.limits), **server.counts))
        else:
            self.send_error_json(RequestError(f"nothing at {self.path}; the page is at / and the API at POST /chat/completions", 404))

    def do_POST(self):
        try:
            if urlsplit(self.path).path not in ("/chat/completions", "/v1/chat/completions"):
                raise RequestError(f"nothing at {self.path}; POST to /chat/completions", 404)
            self.answer(self.read_request())
        except RequestError as e:
            self.send_error_json(e)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.close_connection = True

    def read_request(self):
        """The request's JSON body, checked: (messages, settings)."""
        limits = self.server.limits
        length = self.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise RequestError("send the JSON body with a Content-Length header", 411)
        if int(length) > limits.max_body_bytes:
            raise RequestError(f"the body is {length} bytes; this server takes at most {limits.max_body_bytes}", 413)
        try:
            body = json.loads(self.rfile.read(int(length)))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
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
        try:
            if client_gone(self.connection):  # it left while it waited
                server.count("cancelled")
                return
            max_tokens = min(settings["max_tokens"], room)
            seed = settings["seed"] if settings["seed"] is not None else secrets.randbits(32)
            pieces = reply_pieces(server.engine, prompt, max_tokens, settings["temperature"], settings["top_k"], seed)
            (self.stream if settings["stream"] else self.whole)(pieces, len(prompt), max_tokens)
        finally:
            server.queue.leave()

    def chunk(self, delta, finish_reason=None, **extra):
        return dict(id=self.reply_id, object="chat.completion.chunk", created=self.created, model=self.server.info["model"],
                    choices=[dict(index=0, delta=delta, finish_reason=finish_reason)], **extra)

    def stream(self, pieces, prompt_tokens, max_tokens):
        """Send the reply as server-sent events, one chunk per piece, as it is generated."""
        self.reply_id, self.created = f"chatcmpl-{next(self.server.ids)}", int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Cache-Control", "no-cache")
        self.end_headers()
        self.close_connection = True  # the end of the stream is the end of the connection

        def event(data):
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")
            self.wfile.flush()

        event(self.chunk(dict(role="assistant")))
        tokens = 0
        try:
            for text, part in pieces:
                tokens += 1
                self.server.count("generated_tokens")
                if client_gone(self.connection):
                    raise ConnectionResetError
                if text:
                    event(self.chunk(dict(content=text, part=part)))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.server.count("cancelled")
            self.server.log(f"client went away after {tokens} tokens; generation stopped")
            return
        except Exception as e:  # the model failed: say so in the stream (the status line is already sent)
            event(dict(error=dict(message=f"generation failed: {type(e).__name__}: {e}", type="server_error")))
            raise
        usage = dict(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens)
        event(self.chunk({}, "length" if tokens == max_tokens else "stop", usage=usage))
        self.wfile.write(b"data: [DONE]\n\n")
        self.server.count("served")

    def whole(self, pieces, prompt_tokens, max_tokens):
        """Generate the whole reply, then send it as one JSON object."""
        parts, tokens = [], 0
        try:
            for text, part in pieces:
                tokens += 1
                self.server.count("generated_tokens")
                if client_gone(self.connection):
                    self.server.count("cancelled")
                    self.server.log(f"client went away after {tokens} tokens; generation stopped")
                    return
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
        self.close_connection = True  # an unread body may still be on the wire
        headers = [("Retry-After", "2")] if error.status == 503 else []
        self.send_json(error.status, dict(error=dict(message=str(error), type=error.kind)), headers)

    def log_message(self, format, *args):
        self.server.log(f"{self.address_string()} {format % args}")


class ChatServer(ThreadingHTTPServer):
    """The HTTP server: one thread per connection; the TurnQueue lets one generate at a time."""
    daemon_threads = True
    request_queue_size = 128  # connections the OS holds before they are accepted (the default 5 resets a burst of clients)

    def __init__(self, address, engine, render, info, limits, log=print):
        super().__init__(address, ChatHandler)
        self.engine, self.render, self.info, self.limits, self.log = engine, render, info, limits, log
        self.queue = TurnQueue(limits.max_queue)
        self.counts = dict(served=0, cancelled=0, rejected=0, generated_tokens=0)
        self.ids = itertools.count(1)
        self.count_lock = threading.Lock()

    def count(self, name, n=1):
        with self.count_lock:
            self.counts[name] += n


def serve(engine, render, info, host="127.0.0.1", port=8000, limits=Limits(), log=print):
    """Serve the model behind `engine` until Ctrl-C. `render(messages)` turns a conversation into
    the prompt's token ids (ValueError if it cannot). `info` is shown by /health and the page: at
    least "model", "context" (the most tokens a prompt and its reply may hold) and "defaults"
    (temperature, top_k, max_tokens)."""
    try:
        server = ChatServer((host, port), engine, render, info, limits, log)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None
    host, port = server.server_address[:2]
    log(f"serving the {info.get('stage', '')} model {info['model']} at http://{host}:{port}/ (Ctrl-C stops); "
        f"one request at a time, up to {limits.max_queue} waiting")
    if host in ("127.0.0.1", "localhost", "::1"):
        log("only this machine can connect; --host 0.0.0.0 opens it to the network (no authentication: use a network "
            "you trust, an SSH tunnel or a reverse proxy)")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
