"""download_shards without network: urllib.request.urlopen is replaced by a fake that serves the
bytes of local parquet files (or fails), or the files come from a real HTTP server on 127.0.0.1
that can break a response the ways a network does; time.sleep is replaced by a recorder."""
import http.server
import io
import socket
import threading
import types
import urllib.error
import urllib.request

import pytest

import nanochat_one as nc
import realdata

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

URL = "https://example.invalid/shard_{index:05d}.parquet"


@pytest.fixture
def served(tmp_path):
    """Local shards 0-3 and the validation shard: name -> bytes."""
    shards = {}
    for index in (0, 1, 2, 3, realdata.FINEWEB_VAL_SHARD):
        path = tmp_path / "served" / f"shard_{index:05d}.parquet"
        path.parent.mkdir(exist_ok=True)
        pq.write_table(pa.table({"text": [f"document {j} of shard {index}" for j in range(3)]}), path)
        shards[path.name] = path.read_bytes()
    return shards


@pytest.fixture
def sleeps(monkeypatch):
    waits = []
    monkeypatch.setattr(realdata.time, "sleep", waits.append)
    return waits


class Response(io.BytesIO):
    """What urlopen returns, as far as download reads it: the body, and its length in the headers."""

    def __init__(self, body):
        super().__init__(body)
        self.headers = {"Content-Length": str(len(body))}


def serve(monkeypatch, served, requests, failures=()):
    """Make urlopen serve `served`; failures is a list of callables that take the next requests
    instead (raising, or returning a broken response)."""
    failures = list(failures)

    def urlopen(url, timeout=None):
        requests.append(url.rsplit("/", 1)[-1])
        if failures:
            return failures.pop(0)(url)
        return Response(served[requests[-1]])

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)


def test_download_pins_validation_shard_and_skips_existing(tmp_path, served, sleeps, monkeypatch):
    requests, data = [], tmp_path / "data"
    serve(monkeypatch, served, requests)
    realdata.download_shards(data, 3, url=URL)
    assert requests == ["shard_00000.parquet", "shard_00001.parquet", "shard_01822.parquet"]
    assert sorted(p.name for p in data.iterdir()) == requests  # no temporary files left behind
    for name in requests:
        assert (data / name).read_bytes() == served[name]
    # the pinned last shard is what the loader uses for validation
    assert [t for _, t in realdata.parquet_documents(data, "val")] == [f"document {j} of shard 1822" for j in range(3)]
    # a second call with more shards fetches only the new one
    requests.clear()
    realdata.download_shards(data, 4, url=URL)
    assert requests == ["shard_00002.parquet"]
    assert sleeps == []


def test_download_retries_with_backoff_and_never_leaves_a_partial_shard(tmp_path, served, sleeps, monkeypatch):
    data, requests = tmp_path / "data", []
    target = data / "shard_00000.parquet"

    class DropsMidway(Response):
        def read(self, size=-1):
            if self.tell() > 0:
                raise ConnectionResetError("connection reset by peer")
            return super().read(100)

    def unreachable(url):
        raise urllib.error.URLError(socket.timeout("timed out"))

    seen = []

    def sleep(seconds):  # look at the folder while the download waits to retry
        sleeps.append(seconds)
        seen.append(sorted(p.name for p in data.iterdir()))

    serve(monkeypatch, served, requests, [unreachable, lambda url: DropsMidway(served["shard_00000.parquet"])])
    monkeypatch.setattr(realdata.time, "sleep", sleep)
    realdata.download_shards(data, 2, url=URL)
    assert requests[:3] == ["shard_00000.parquet"] * 3  # failed, dropped midway, succeeded
    assert sleeps == [1.0, 2.0]  # exponential backoff
    assert seen == [[], []]  # while waiting to retry: neither the shard nor a temporary file
    assert target.read_bytes() == served["shard_00000.parquet"]


def test_offline_download_is_one_clear_error(tmp_path, served, sleeps, monkeypatch, base_dir, capsys):
    def offline(url, timeout=None):
        raise urllib.error.URLError(socket.gaierror(-3, "Temporary failure in name resolution"))

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(realdata.DataError) as info:
        realdata.download_shards(tmp_path / "data", 2)
    message = str(info.value)
    assert "could not download https://huggingface.co/datasets/karpathy/fineweb-edu-100b-shuffle/resolve/main/" \
           "shard_00000.parquet after 5 attempts" in message
    assert "name resolution" in message and "--data-dir FOLDER" in message and "\n" not in message
    assert sleeps == [1.0, 2.0, 4.0, 8.0]
    assert list((tmp_path / "data").iterdir()) == []
    # through the CLI: --data hf without --data-dir downloads into <base_dir>/base_data
    with pytest.raises(SystemExit) as exit_info:
        nc.main(["--stage", "tok", "--data", "hf", "--num-shards", "3"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().splitlines() == [f"error: {message}"]
    assert (base_dir / "base_data").is_dir()


def test_hf_data_dir_is_used_as_given(tmp_path, served, monkeypatch):
    for name, blob in served.items():
        (tmp_path / name).write_bytes(blob)
    args = nc.build_parser().parse_args(["--stage", "tok", "--data", "hf", "--data-dir", str(tmp_path)])
    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("nothing should be downloaded"))
    nc.prepare_base_data(args, nc.Dist())
    assert next(nc.document_stream(args, "val")) == (0, "document 0 of shard 1822")


@pytest.fixture
def http_server(served, monkeypatch):
    """A real HTTP server on 127.0.0.1 that serves `served`. Append to .breaks to break the next
    responses: "short" announces the whole length (Content-Length) but sends half the body, "chunked"
    sends half the body as one chunk of a chunked response; then each closes the connection."""
    breaks, requests = [], []

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            name = self.path.rsplit("/", 1)[-1]
            requests.append(name)
            body, broken = served[name], breaks.pop(0) if breaks else None
            self.send_response(200)
            if broken == "chunked":  # one chunk, and never the empty chunk that ends the body
                self.send_header("Transfer-Encoding", "chunked")
                self.end_headers()
                self.wfile.write(b"%x\r\n%s\r\n" % (len(body) // 2, body[: len(body) // 2]))
            else:
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body[: len(body) // 2] if broken == "short" else body)
            self.close_connection = True

        def log_message(self, *args):  # no request log in the test output
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("no_proxy", "*")  # straight to 127.0.0.1, whatever proxy the environment names
    yield types.SimpleNamespace(url=f"http://127.0.0.1:{server.server_port}/shard_{{index:05d}}.parquet",
                                breaks=breaks, requests=requests)
    server.shutdown()
    server.server_close()
    thread.join(timeout=10)


def test_download_of_a_body_cut_short_is_retried(tmp_path, served, sleeps, http_server):
    """The connection closes cleanly halfway through the announced length: only the length tells
    that from a whole shard, and the half is a failed attempt, never renamed as the shard."""
    data = tmp_path / "data"
    http_server.breaks.append("short")
    realdata.download_shards(data, 2, url=http_server.url)
    assert (data / "shard_00000.parquet").read_bytes() == served["shard_00000.parquet"]
    assert http_server.requests == ["shard_00000.parquet", "shard_00000.parquet", "shard_01822.parquet"]
    assert sleeps == [1.0]
    assert sorted(p.name for p in data.iterdir()) == ["shard_00000.parquet", "shard_01822.parquet"]


def test_download_of_a_broken_chunked_body_is_retried_and_leaves_no_file(tmp_path, served, sleeps, http_server):
    """A chunked response cut short raises http.client.IncompleteRead, which is no OSError: it is
    retried as well, and when every attempt fails the error is one line and the folder stays empty."""
    data = tmp_path / "data"
    http_server.breaks.extend(["chunked", "chunked"])
    with pytest.raises(realdata.DataError) as info:
        realdata.download_shards(data, 2, url=http_server.url, attempts=2)
    assert "after 2 attempts (IncompleteRead(" in str(info.value) and "\n" not in str(info.value)
    assert list(data.iterdir()) == []  # neither a shard nor a temporary file
    assert sleeps == [1.0]
    http_server.breaks.append("chunked")
    realdata.download_shards(data, 2, url=http_server.url, attempts=2)
    assert (data / "shard_00000.parquet").read_bytes() == served["shard_00000.parquet"]
    assert sorted(p.name for p in data.iterdir()) == ["shard_00000.parquet", "shard_01822.parquet"]


def test_a_length_that_is_no_ascii_number_is_not_read_as_one(monkeypatch, tmp_path):
    """"²".isdigit() is True and int("²") raises: a server's odd Content-Length must not crash the download."""
    class Odd(Response):
        def __init__(self, body):
            super().__init__(body)
            self.headers = {"Content-Length": "²"}

    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: Odd(b"PAR1 body"))
    realdata.download("https://example.invalid/x.parquet", tmp_path / "x.parquet")
    assert (tmp_path / "x.parquet").read_bytes() == b"PAR1 body"
