"""
Talk to a model in a browser: a small HTTP server for `python nanochat_one.py --stage serve`.

Standard library only, and it imports nothing from nanochat_one.py: the stage hands it each
stage's Engine and the conversation renderers (see `serve`), and this module does the HTTP.
`reply_pieces` turns the engine's tokens into the reply's parts as they come, for this server
and for --stage chat. Every path also answers without its /v1 prefix.

    GET  /                      chat.html, the chat page
    GET  /health                the models' name, default stage and step; limits, defaults, queue, counters
    GET  /v1/models             the stages served (base, mid, sft, rl: those with a checkpoint), OpenAI's shape
    POST /v1/chat/completions   {"model": "sft", "messages": [...], "stream": true, "temperature": 0.6,
                                "top_k": 50, "max_tokens": 256, "seed": 1, "logprobs": true, "top_logprobs": 5}:
                                the shape of OpenAI's chat API, so curl and existing clients work
    POST /v1/completions        {"model": "base", "prompt": "Once upon a time", "logprobs": 5, ...}: a text
                                continues (after <|bos|>, as the base model read its documents)
    POST /v1/tokenize           {"messages": [...]}: the conversation as the trainer renders it, one
                                {"id", "text", "special", "trained"} per token ("trained": SFT's loss mask)

`model` picks the stage that answers (default: --source). Streaming replies are server-sent events:
one `data: {json}` chunk per piece of the reply, then `data: [DONE]`. Each chunk's delta carries its
`content` and a `part`: "text", "python" (a calculator expression the model writes) or
"python_output" (the result the tool forced in). A whole reply (`"stream": false`) comes back with
`content`, where calculator calls read `[calculator: 12*7 = 84]`, and `parts`, the same reply as a
list of {"type", "text"}: send `parts` back as the assistant's content in the next request and the
model sees its calculator calls as it made them (a plain string is read as plain text).

Log-probabilities are the model's own: log_softmax of its logits at temperature 1, whatever the
temperature and top_k that sampled (Engine.generate). A chat reply's come as OpenAI's
`choices[0].logprobs.content`, one {"token", "logprob", "bytes", "top_logprobs"} per token of the
reply (its special tokens too, named, with "bytes" null), in each streamed chunk the entry of its
token; a text completion's in the legacy shape, `choices[0].logprobs` with "tokens",
"token_logprobs", "top_logprobs" (one {token: logprob} per token) and "text_offset". A token the
calculator forced in, not sampled, is marked: "forced": true on its entry (a completion: a
"forced" list of booleans beside the others).

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
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for, as OpenAI allows
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


@dataclass
class Checkpoint:
    """A model the server answers with, named in requests by its stage ("base", "mid", "sft", "rl")."""
    engine: object  # nanochat_one.Engine, or anything with its generate, tokenizer and stop_tokens
    step: int
    context: int  # the most tokens a prompt and its reply may hold: the length the model was trained on
    created: int  # when the checkpoint was written (Unix time), as GET /v1/models reports it


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


def check_messages(messages, limits, for_reply=True):
    """Raise RequestError unless `messages` is a list of {"role", "content"} within the limits, ending
    with the user's message when it asks for a reply. (Which roles may follow which is the model's
    renderer's to say.)"""
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
    if for_reply and messages[-1]["role"] != "user":
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


def scored_tokens(engine, prompt, max_tokens, temperature, top_k, seed, top_logprobs):
    """One reply's tokens as (token, score), ending before the stop token or after max_tokens. score is
    None, or with top_logprobs=k (Engine.generate) dict(sampled=False for a token the tool forced,
    logprob=the model's log-probability of the token, top=the k likeliest tokens as (token, logprob))."""
    for step in engine.generate(prompt, 1, max_tokens, temperature, top_k, seed=seed, top_logprobs=top_logprobs):
        (token,), (sampled,) = step[:2]
        if token in engine.stop_tokens:
            return
        if top_logprobs is None:
            yield token, None
        else:
            logprob, top = step[2][0]
            yield token, dict(sampled=sampled, logprob=logprob, top=top)


def reply_pieces(engine, prompt, max_tokens, temperature=0.6, top_k=None, seed=42, top_logprobs=None):
    """The assistant's reply to a prompt (render_for_completion), one (text, part) pair per token:
    part is "text", "python" (a calculator expression the model writes) or "python_output" (the
    tool's result, forced in), the part types of render_conversation. The special tokens around a
    part carry no text, and a character split across tokens comes whole with its last token.
    Ends before the stop token, or after max_tokens. With top_logprobs=k, (text, part, token, score)
    instead (scored_tokens)."""
    s = engine.tokenizer.special_tokens
    next_part = {s["<|python_start|>"]: "python", s["<|python_end|>"]: "text",
                 s["<|output_start|>"]: "python_output", s["<|output_end|>"]: "text"}
    decoder, part = codecs.getincrementaldecoder("utf-8")(errors="replace"), "text"
    for token, score in scored_tokens(engine, prompt, max_tokens, temperature, top_k, seed, top_logprobs):
        if token in next_part:
            text = decoder.decode(b"", final=True)
            piece, part = (text, part), next_part[token]
        else:
            piece = decoder.decode(engine.tokenizer.token_to_bytes(token)), part
        yield piece if score is None else (*piece, token, score)


def completion_pieces(engine, prompt, max_tokens, temperature=0.6, top_k=None, seed=42, top_logprobs=None):
    """A text completion, one (text, token, score) per token (scored_tokens): the text as it comes, a
    character split across tokens whole with its last token, a special token written by its name."""
    decoder, names = codecs.getincrementaldecoder("utf-8")(errors="replace"), engine.tokenizer.inverse_special
    for token, score in scored_tokens(engine, prompt, max_tokens, temperature, top_k, seed, top_logprobs):
        if token in names:
            yield decoder.decode(b"", final=True) + names[token], token, score
        else:
            yield decoder.decode(engine.tokenizer.token_to_bytes(token)), token, score


def token_form(tokenizer, token):
    """A token as OpenAI's logprobs write it: {"token": its text, "bytes": its UTF-8 bytes}. A token
    that is not whole characters reads "bytes:\\xe2\\x82" (as OpenAI writes them); a special token
    reads as its name, with bytes null (it stands for no text)."""
    if token in tokenizer.inverse_special:
        return dict(token=tokenizer.inverse_special[token], bytes=None)
    data = tokenizer.token_to_bytes(token)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        text = "bytes:" + "".join(f"\\x{b:02x}" for b in data)
    return dict(token=text, bytes=list(data))


def chat_logprob(tokenizer, token, score):
    """One entry of a chat reply's choices[0].logprobs.content, with "forced": true on a token the
    calculator forced in (not sampled: its logprob says how likely the model found it)."""
    entry = dict(token_form(tokenizer, token), logprob=score["logprob"],
                 top_logprobs=[dict(token_form(tokenizer, t), logprob=lp) for t, lp in score["top"]])
    return entry | (dict(forced=True) if not score["sampled"] else {})


def completion_logprobs(tokenizer, scored, offset):
    """The legacy choices[0].logprobs of a text completion for `scored`, a list of (text, token, score):
    parallel lists of tokens, their logprobs, their top alternatives ({token: logprob}), the character
    offset where each token's text begins in prompt + completion (from `offset`), and "forced"."""
    tokens, offsets = [token_form(tokenizer, token)["token"] for _, token, _ in scored], []
    for text, _, _ in scored:
        offsets.append(offset)
        offset += len(text)
    return dict(tokens=tokens, token_logprobs=[score["logprob"] for _, _, score in scored],
                top_logprobs=[{token_form(tokenizer, t)["token"]: lp for t, lp in score["top"]}
                              for _, _, score in scored],
                text_offset=offsets, forced=[not score["sampled"] for _, _, score in scored])


class ChatReply:
    """How a chat completion's pieces (reply_pieces) become OpenAI's JSON: the chunks of a stream, or
    the choice of a whole reply. With logprobs each chunk carries its token's entry, as OpenAI streams them."""
    prefix, chunk_object, whole_object = "chatcmpl", "chat.completion.chunk", "chat.completion"

    def __init__(self, tokenizer, settings, body):
        self.tokenizer, self.model, self.scored = tokenizer, settings["model"], settings["top_logprobs"] is not None
        self.opening = dict(delta=dict(role="assistant"), logprobs=None, finish_reason=None)

    def logprobs(self, pieces):
        return dict(content=[chat_logprob(self.tokenizer, *piece[2:]) for piece in pieces]) if self.scored else None

    def chunk(self, piece):
        return dict(delta=dict(content=piece[0], part=piece[1]), logprobs=self.logprobs([piece]), finish_reason=None)

    def ending(self, finish_reason):
        return dict(delta={}, logprobs=None, finish_reason=finish_reason)

    def whole(self, pieces):
        parts = []
        for piece in pieces:
            add_piece(parts, *piece[:2])
        return dict(message=dict(role="assistant", content=display(parts), parts=parts), logprobs=self.logprobs(pieces))


class TextReply(ChatReply):
    """The same for a text completion's pieces (completion_pieces), in the legacy shape of OpenAI's
    /v1/completions: choices[0].text, and logprobs as parallel lists (completion_logprobs)."""
    prefix, chunk_object, whole_object = "cmpl", "text_completion", "text_completion"

    def __init__(self, tokenizer, settings, body):
        super().__init__(tokenizer, settings, body)
        self.opening, self.offset = None, len(body["prompt"])  # text_offset counts the prompt's characters too

    def chunk(self, piece):
        logprobs = completion_logprobs(self.tokenizer, [piece], self.offset) if self.scored else None
        self.offset += len(piece[0])
        return dict(text=piece[0], logprobs=logprobs, finish_reason=None)

    def ending(self, finish_reason):
        return dict(text="", logprobs=None, finish_reason=finish_reason)

    def whole(self, pieces):
        logprobs = completion_logprobs(self.tokenizer, pieces, self.offset) if self.scored else None
        return dict(text="".join(piece[0] for piece in pieces), logprobs=logprobs)


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
        self.holding = False  # whether this request has the model (answer)

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
            server = self.server
            if path in ("/", "/index.html"):
                self.send(200, PAGE.read_bytes(), "text/html; charset=utf-8")
            elif path == "/health":
                queue, default = server.queue, server.models[server.info["stage"]]
                self.send_json(200, dict(status="ok", **server.info, step=default.step, context=default.context,
                                         models=list(server.models), busy=queue.next_ticket > queue.now_serving,
                                         waiting=queue.waiting, connections=len(server.connections),
                                         limits=asdict(server.limits), **server.counts))
            elif path in ("/models", "/v1/models"):
                self.send_json(200, dict(object="list", data=[
                    dict(id=name, object="model", created=model.created, owned_by="nanochat-one", step=model.step,
                         context=model.context) for name, model in server.models.items()]))
            else:
                raise RequestError(f"nothing at {shorten(self.path)}; the page is at / and the API at "
                                   "POST /v1/chat/completions, POST /v1/completions, GET /v1/models", 404)
        except RequestError as e:
            self.send_error_json(e)

    def do_POST(self):
        limits = self.server.limits
        try:
            length = self.body_length()
            self.unread = min(length, 2 * limits.max_body_bytes)  # what an early answer reads first (send_error_json)
            self.check_origin()
            # the OpenAI paths, with or without their /v1 prefix
            endpoint = self.path.partition("?")[0].removeprefix("/v1")
            if endpoint not in ("/chat/completions", "/completions", "/tokenize"):
                raise RequestError(f"nothing at {shorten(self.path)}; POST to /v1/chat/completions, /v1/completions "
                                   "or /v1/tokenize", 404)
            if length > limits.max_body_bytes:
                raise RequestError(f"the body is {length} bytes; this server takes at most {limits.max_body_bytes}",
                                   413)
            body = self.read_body(length)
            self.server.settle(self.connection)
            if endpoint == "/tokenize":
                self.tokenize(body)
            else:
                self.answer(endpoint == "/chat/completions", body)
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

    def read_body(self, length):
        """The request's JSON body: an object."""
        data = self.rfile.read(length)
        self.unread = 0
        try:
            body = json.loads(data, parse_int=parse_integer)
        except RecursionError:
            raise RequestError("the body's JSON is nested too deeply") from None
        except ValueError as e:  # including UnicodeDecodeError and json.JSONDecodeError
            raise RequestError(f"the body is not valid JSON ({e})") from None
        if not isinstance(body, dict):
            raise RequestError('the body must be a JSON object with "messages" (or, for /v1/completions, "prompt")')
        return body

    def settings(self, body, chat):
        """The request's model and sampling settings, checked. top_logprobs is None unless logprobs are asked
        for: chat's "logprobs": true with "top_logprobs" 0-20, a completion's "logprobs" 0-20 (OpenAI's two
        ways)."""
        limits, defaults, models = self.server.limits, self.server.info["defaults"], self.server.models
        model = body.get("model") or self.server.info["stage"]
        if not isinstance(model, str) or model not in models:
            raise RequestError(f"no model {shorten(str(model))!r} here; this server has {', '.join(models)} "
                               "(GET /v1/models)", 404, "model_not_found")
        if not isinstance(body.get("stream", False), bool):
            raise RequestError('"stream" must be true or false')
        if chat:
            if body.get("logprobs") is not None and not isinstance(body["logprobs"], bool):
                raise RequestError('"logprobs" must be true or false (top_logprobs says how many alternatives)')
            top_logprobs = number(body, "top_logprobs", 0, int, 0, MAX_TOP_LOGPROBS)
            if body.get("top_logprobs") is not None and not body.get("logprobs"):
                raise RequestError('"top_logprobs" needs "logprobs": true')
            top_logprobs = top_logprobs if body.get("logprobs") else None
        else:
            top_logprobs = number(body, "logprobs", None, int, 0, MAX_TOP_LOGPROBS)
        return dict(model=model, stream=body.get("stream", False), top_logprobs=top_logprobs,
                    temperature=number(body, "temperature", defaults["temperature"], float, 0.0, 2.0),
                    top_k=number(body, "top_k", defaults["top_k"], int, 1, 1 << 20),
                    max_tokens=number(body, "max_tokens", defaults["max_tokens"], int, 1, limits.max_new_tokens),
                    seed=number(body, "seed", None, int, 0, 2 ** 63 - 1))

    def prompt(self, body, chat):
        """The prompt's token ids: the conversation as rendered for the assistant's reply, or the text after
        <|bos|>, as the base model read its documents."""
        server = self.server
        if chat:
            check_messages(body.get("messages"), server.limits)
            try:
                return server.render(body["messages"])
            except ValueError as e:  # roles out of order, ...: the renderer's own words
                raise RequestError(str(e)) from None
        text = body.get("prompt")
        if not isinstance(text, str):
            raise RequestError('"prompt" must be a string (one prompt: this server writes one completion at a time)')
        if len(text) > server.limits.max_message_chars:
            raise RequestError(f"the prompt has {len(text)} characters; this server takes at most "
                               f"{server.limits.max_message_chars}")
        tokenizer = server.tokenizer
        return [tokenizer.special_tokens["<|bos|>"]] + tokenizer.encode_ordinary(text)

    def answer(self, chat, body):
        """A chat completion (chat) or a text completion, streamed or whole."""
        server = self.server
        settings = self.settings(body, chat)
        prompt, model = self.prompt(body, chat), server.models[settings["model"]]
        room = model.context - len(prompt)
        if room < 1:
            raise RequestError(f"the {'conversation' if chat else 'prompt'} is {len(prompt)} tokens and this model "
                               f"reads at most {model.context}: " + ("start a new chat" if chat else "shorten it"))
        if not server.queue.enter():
            server.count("rejected")
            raise RequestError(f"busy: {server.limits.max_queue} requests are already waiting; try again shortly", 503, "busy")
        self.wfile.eager = self.holding = True  # the model is ours now: writing must not wait for the client
        try:
            max_tokens = min(settings["max_tokens"], room)
            seed = settings["seed"] if settings["seed"] is not None else secrets.randbits(32)
            sample = (model.engine, prompt, max_tokens, settings["temperature"], settings["top_k"], seed,
                      settings["top_logprobs"])
            reply = (ChatReply if chat else TextReply)(model.engine.tokenizer, settings, body)
            pieces = (reply_pieces if chat else completion_pieces)(*sample)
            generated = (self.stream if settings["stream"] else self.whole)(pieces, reply, len(prompt), max_tokens)
        finally:
            self.release()
        if generated:
            try:
                self.wfile.flush()  # what the client has not taken yet, by its deadline
            except (ConnectionError, TimeoutError) as e:
                server.log(f"client did not take all of its reply ({e}); connection closed")

    def release(self):
        """Give the model to the next request, once, as soon as the reply is generated: before its last words
        are sent, so that a client that reads them and asks again at once finds the model free."""
        if self.holding:
            self.wfile.eager = self.holding = False
            self.wfile.restart()  # the client has its time again for the rest
            self.server.queue.leave()

    def stream(self, pieces, reply, prompt_tokens, max_tokens):
        """Send the reply as server-sent events, one chunk per piece, as it is generated; False if the
        client went away (a write fails once it has closed: a half-closed client still reads)."""
        reply_id, created = f"{reply.prefix}-{next(self.server.ids)}", int(time.time())
        self.close_connection = True  # the end of the stream is the end of the connection

        def event(choice, **extra):
            data = dict(id=reply_id, object=reply.chunk_object, created=created, model=reply.model,
                        choices=[dict(index=0, **choice)], **extra)
            self.wfile.write(b"data: " + json.dumps(data).encode() + b"\n\n")

        tokens = 0
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream; charset=utf-8")
            self.send_header("Cache-Control", "no-cache")
            self.end_headers()
            if reply.opening is not None:
                event(reply.opening)
            for piece in pieces:
                tokens += 1
                self.server.count("generated_tokens")
                if piece[0] or reply.scored:  # a piece with no text (half a character, a part's mark) carries its score
                    event(reply.chunk(piece))
        except ConnectionError:
            self.server.count("cancelled")
            self.server.log(f"client went away after {tokens} tokens; generation stopped")
            return False
        except Exception as e:  # the model failed: say so in the stream (the status line is already sent)
            failure = dict(message=f"generation failed: {type(e).__name__}: {e}", type="server_error")
            self.wfile.write(b"data: " + json.dumps(dict(error=failure)).encode() + b"\n\n")
            raise
        self.server.count("served")
        self.release()
        usage = dict(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens)
        event(reply.ending("length" if tokens == max_tokens else "stop"), usage=usage)
        self.wfile.write(b"data: [DONE]\n\n")
        return True

    def whole(self, pieces, reply, prompt_tokens, max_tokens):
        """Generate the whole reply, then send it as one JSON object. (Nothing is written until then, so
        a client that closed cannot be told from a half-closed one that waits: the reply runs to its end.)"""
        collected = []
        try:
            for piece in pieces:
                collected.append(piece)
                self.server.count("generated_tokens")
        except Exception as e:
            self.server.log(f"generation failed: {type(e).__name__}: {e}")
            raise RequestError(f"generation failed: {type(e).__name__}: {e}", 500, "server_error") from None
        self.server.count("served")
        self.release()
        tokens = len(collected)
        self.send_json(200, dict(
            id=f"{reply.prefix}-{next(self.server.ids)}", object=reply.whole_object, created=int(time.time()),
            model=reply.model, choices=[dict(index=0, **reply.whole(collected),
                                             finish_reason="length" if tokens == max_tokens else "stop")],
            usage=dict(prompt_tokens=prompt_tokens, completion_tokens=tokens, total_tokens=prompt_tokens + tokens)))
        return True

    def tokenize(self, body):
        """The conversation as the trainer renders it (render_conversation): each token's id, its text (a special
        token by name), and whether SFT trains on it (its loss mask). Needs no model: it does not wait its turn."""
        server = self.server
        check_messages(body.get("messages"), server.limits, for_reply=False)
        try:
            ids, mask = server.render_training(body["messages"])
        except ValueError as e:
            raise RequestError(str(e)) from None
        tokenizer = server.tokenizer
        self.send_json(200, dict(object="list", data=[
            dict(id=token, text=token_form(tokenizer, token)["token"], special=token in tokenizer.inverse_special,
                 trained=bool(trained)) for token, trained in zip(ids, mask)]))

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

    def __init__(self, address, models, render, render_training, info, limits, log=print, allowed_hosts=()):
        super().__init__(address, ChatHandler)
        self.models, self.render, self.render_training = models, render, render_training
        # every stage of one model tag reads one tokenizer (stage_serve loads them all with it)
        self.tokenizer = next(iter(models.values())).engine.tokenizer
        self.info, self.limits, self.log = info, limits, log
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


def serve(models, render, render_training, info, host="127.0.0.1", port=8000, limits=Limits(), log=print,
          allowed_hosts=()):
    """Serve `models`, {name: Checkpoint}, until Ctrl-C; they share one tokenizer. `render(messages)`
    turns a conversation into the prompt's token ids, `render_training(messages)` into the trainer's
    (ids, loss mask) (ValueError if they cannot). `info` is shown by /health and the page: "model"
    (the models' tag), "stage" (the name of the one a request gets unless it names another) and
    "defaults" (temperature, top_k, max_tokens). `allowed_hosts`: more names for the Host and Origin
    headers than the address it listens on (ChatHandler.check_origin)."""
    try:
        server = ChatServer((host, port), models, render, render_training, info, limits, log, allowed_hosts)
    except OSError as e:
        raise OSError(f"cannot listen on {host}:{port} ({e.strerror}): pass another --port or --host") from None
    host, port = server.server_address[:2]
    others = ", ".join(name for name in models if name != info["stage"])
    log(f"serving the {info['stage']} model {info['model']}{f' (and {others})' if others else ''} at "
        f"http://{host}:{port}/ (Ctrl-C stops); one request at a time, up to {limits.max_queue} waiting")
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
