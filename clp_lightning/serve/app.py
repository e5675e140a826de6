"""``clp serve``: steer a trained policy from a web page (one slider per objective) or a JSON endpoint.

    clp serve --config conf/quickstart.yaml --ckpt_path runs/quickstart/rl/checkpoints/last.ckpt
    clp serve exported/quickstart                               # a directory written by `clp export`
    clp serve exported/quickstart --config conf/quickstart.yaml  # ... scored with that config's rewards

Endpoints: ``GET /`` (the page), ``GET /api/info`` (objectives and limits), ``GET /api/front`` (the last grid
evaluation), ``POST /generate`` with ``{"prompt": "...", "weights": [0.3, 0.7]}`` (and ``"alpha"``, the KL strength of
a policy conditioned on it) and ``Content-Type: application/json``, answering ``{"response", "rewards", "weights"}``
(and ``"alpha"``), or ``{"error"}`` with status 400 (bad request), 403 (a loopback server asked for another host),
503 (busy) or 500. Replies are strict JSON: a reward that is not a finite number is ``null``.

Built on the standard library's ``ThreadingHTTPServer`` and one static page (vanilla JS and CSS, inline): no new
runtime dependency, no asset fetched from a CDN (the page works offline), and the page calls the same JSON endpoint as
scripts do. Generation is greedy and runs one request at a time; requests beyond ``--max_waiting`` get 503, as do
connections beyond ``Server.max_connections`` open at once.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import ipaddress
import json
import logging
import math
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import torch

from clp_lightning.checks import is_number
from clp_lightning.conditioning.weights import validate_weights
from clp_lightning.files import json_text
from clp_lightning.serve.backends import Backend, from_checkpoint, from_directory

log = logging.getLogger(__name__)
PAGE = Path(__file__).with_name("static") / "index.html"
MAX_NEW_TOKENS_CAP = 1024
WEIGHTS_ATOL = 1e-3  # a page's sliders or a script's rounded numbers, not exact floats
# the page's KL slider computes low * (high / low) ** t (or low + (high - low) * t), which lands a rounding error past
# the range's end at t = 1 (0.01 * 70.0 ** 1 = 0.7000000000000001); such a value is taken as the end it rounds from
ALPHA_RTOL = 1e-9


class RequestError(Exception):
    """A request the server refuses; ``status`` is its HTTP status, the message goes to the client."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass
class Limits:
    """Bounds on what one request may cost.

    Attributes:
        max_prompt_chars: longest prompt, in characters.
        max_new_tokens: response length (greedy decoding), at most ``MAX_NEW_TOKENS_CAP``.
        max_waiting: requests that may wait while one generates; more get 503.
    """

    max_prompt_chars: int = 4000
    max_new_tokens: int = 64
    max_waiting: int = 4

    def __post_init__(self) -> None:
        if self.max_prompt_chars < 1:
            raise ValueError(f"--max_prompt_chars must be >= 1, got {self.max_prompt_chars}")
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS_CAP:
            raise ValueError(f"--max_new_tokens must be in [1, {MAX_NEW_TOKENS_CAP}], got {self.max_new_tokens}")
        if self.max_waiting < 0:
            raise ValueError(f"--max_waiting must be >= 0, got {self.max_waiting}")

    @property
    def max_body_bytes(self) -> int:
        # JSON may escape a character as up to 12 bytes (a surrogate pair, \ud83d\ude00); 4 KiB for the rest
        return 12 * self.max_prompt_chars + 4096


class Gate:
    """One generation at a time, at most ``max_waiting`` requests queued behind it; the rest are refused at once."""

    def __init__(self, max_waiting: int) -> None:
        self.max_inside = max_waiting + 1
        self.inside = 0
        self.count_lock, self.run_lock = threading.Lock(), threading.Lock()

    @contextlib.contextmanager
    def enter(self) -> Iterator[None]:
        with self.count_lock:
            if self.inside >= self.max_inside:
                raise RequestError("busy, try again: other requests are generating", status=503)
            self.inside += 1
        try:
            with self.run_lock:
                yield
        finally:
            with self.count_lock:
                self.inside -= 1


class ServeApp:
    """The HTTP-independent part of the server: request checks, the gate, and what each endpoint answers."""

    def __init__(self, backend: Backend, limits: Limits) -> None:
        self.backend, self.limits = backend, limits
        self.gate = Gate(limits.max_waiting)
        self.page = PAGE.read_bytes()

    def info(self) -> dict[str, Any]:
        alpha_range = self.backend.alpha_range
        return {"objectives": self.backend.objectives, "max_prompt_chars": self.limits.max_prompt_chars,
                "max_new_tokens": self.limits.max_new_tokens, "weights_atol": WEIGHTS_ATOL,
                "alpha_range": None if alpha_range is None else list(alpha_range),
                "has_front": self.backend.front() is not None}  # the page asks for /api/front only then

    def generate(self, body: bytes) -> dict[str, Any]:
        prompt, weights, alpha = self.parse(body)
        with self.gate.enter():
            out = self.backend.generate(prompt, torch.tensor(weights, dtype=torch.float32), alpha)
        # echoed in float64 (not the float32 the model reads), so a client can send the same weighting again
        reply = {"response": out["response"], "rewards": out["rewards"], "weights": weights}
        if self.backend.alpha_range is not None:
            reply["alpha"] = self.backend.alpha_range[0] if alpha is None else alpha
        return reply

    def parse(self, body: bytes) -> tuple[str, list[float], float | None]:
        """The prompt, the weighting (``m`` numbers) and the optional KL strength ``alpha`` of a ``POST /generate``
        body, or a :class:`RequestError`."""
        m = len(self.backend.objectives)
        example = json.dumps({"prompt": "...", "weights": [round(1 / m, 3)] * m})
        try:
            request = json.loads(body.decode("utf-8"))
        except UnicodeDecodeError:
            raise RequestError("request body is not UTF-8 text; expected JSON such as " + example) from None
        except json.JSONDecodeError as err:
            raise RequestError(f"request body is not valid JSON ({err.msg} at line {err.lineno} column {err.colno}); "
                               f"expected an object such as {example}") from None
        except (ValueError, RecursionError) as err:  # an integer of over 4300 digits; arrays nested too deep
            raise RequestError(f"request body is not JSON that this server reads ({type(err).__name__}); expected an "
                               f"object such as {example}") from None
        if not isinstance(request, dict):
            raise RequestError(f"request body must be a JSON object such as {example}, got {type(request).__name__}")
        if unknown := sorted(set(request) - {"prompt", "weights", "alpha"}):
            raise RequestError(f"unknown field(s) {unknown}; expected only 'prompt', 'weights' and 'alpha'")
        prompt = request.get("prompt")
        if not isinstance(prompt, str):
            raise RequestError(f"'prompt' must be a string (the post or article), got {_kind(prompt)}")
        if not prompt.strip():
            raise RequestError("'prompt' is empty: write the post or article to respond to")
        if len(prompt) > self.limits.max_prompt_chars:
            raise RequestError(f"'prompt' is {len(prompt)} characters long, over the limit of "
                               f"{self.limits.max_prompt_chars} (the server's --max_prompt_chars)")
        try:  # JSON's "\ud800" escape decodes to a lone surrogate, which no tokenizer encodes
            prompt.encode("utf-8")
        except UnicodeEncodeError as err:
            raise RequestError(f"'prompt' has an unpaired UTF-16 surrogate at character {err.start} "
                               f"({prompt[err.start]!r}), which is not text; send the character itself, or "
                               "both halves of its surrogate pair") from None
        weights = request.get("weights")
        if not isinstance(weights, list) or not all(is_number(w) for w in weights):
            raise RequestError(f"'weights' must be a list of {m} numbers, one per objective "
                               f"({', '.join(self.backend.objectives)}), got {_kind(weights)}")
        try:
            weights = [float(w) for w in weights]
        except OverflowError:  # an integer beyond float range
            raise RequestError(f"'weights' must be numbers in [0, 1], got {_kind(weights)}") from None
        try:
            validate_weights(weights, m, atol=WEIGHTS_ATOL, name="'weights'")
        except ValueError as err:
            raise RequestError(f"{err} (objectives: {', '.join(self.backend.objectives)})") from None
        total = sum(weights)  # the tolerance is for rounded numbers; the model gets the point on the simplex
        return prompt, [w / total for w in weights], self._alpha(request.get("alpha"))

    def _alpha(self, alpha: Any) -> float | None:
        if alpha is None:
            return None
        alpha_range = self.backend.alpha_range
        if alpha_range is None:
            raise RequestError(f"'alpha' {_kind(alpha)} given, but this policy is not conditioned on the KL strength")
        low, high = alpha_range
        slack = ALPHA_RTOL * max(abs(low), abs(high))
        if not is_number(alpha) or not low - slack <= _as_float(alpha) <= high + slack:
            raise RequestError(f"'alpha' must be a number in [{low}, {high}] (the KL strengths the policy was "
                               f"trained on), got {_kind(alpha)}")
        return min(max(float(alpha), low), high)


def _as_float(x: int | float) -> float:
    """``float(x)``, or nan for an integer beyond float range (which no bound admits)."""
    try:
        return float(x)
    except OverflowError:
        return math.nan


def _kind(value: Any) -> str:
    text = json.dumps(value)
    return "nothing" if value is None else text if len(text) <= 40 else f"{type(value).__name__} {text[:40]}..."


class Handler(BaseHTTPRequestHandler):
    """Routes requests to the server's :class:`ServeApp`; never sends a traceback."""

    server: Server
    server_version = "clp-serve"
    timeout = 30  # a client that stops sending mid-request frees its thread

    def do_GET(self) -> None:
        if self._foreign_host():
            return
        app, path = self.server.app, urlsplit(self.path).path
        if path in ("/", "/index.html"):
            self._send(200, app.page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(200, app.info())
        elif path == "/api/front":
            front = app.backend.front()
            self._json(200, front) if front else self._json(404, {"error": "no grid evaluation to show"})
        else:
            self._json(404, {"error": f"no page {path!r}; try / or /api/info"})

    def do_POST(self) -> None:
        if self._foreign_host():
            return
        if urlsplit(self.path).path != "/generate":
            self._json(404, {"error": f"no endpoint {self.path!r}; POST to /generate"})
            return
        try:
            self._json(200, self.server.app.generate(self._body()))
        except RequestError as err:
            self._json(err.status, {"error": str(err)})
        except Exception:
            log.exception("generation failed")
            self._json(500, {"error": "internal error while generating (details are in the server's log)"})

    def _foreign_host(self) -> bool:
        """Refuse (403) a request to a server listening on loopback that names another host: a web page whose name
        its owner re-points at 127.0.0.1 (DNS rebinding) is the same origin to the browser, so neither CORS nor the
        Content-Type check stops it, but its requests still say that name in ``Host``."""
        host = self.headers.get("Host")
        if not self.server.private or host is None:  # a client that sends no Host is no browser
            return False
        try:
            name = urlsplit(f"//{host}").hostname
        except ValueError:  # "[bad"
            name = None
        if name is not None and is_loopback(name):
            return False
        port = self.server.server_address[1]
        self._json(403, {"error": f"Host {host!r} is not this machine: a server listening on loopback answers "
                                  f"only requests to localhost or a loopback address, e.g. http://127.0.0.1:{port}/"})
        return True

    def _body(self) -> bytes:
        limit = self.server.app.limits.max_body_bytes
        if self.headers.get_content_type() != "application/json":
            # also keeps other web sites from posting to a local server with a form or a plain-text fetch
            raise RequestError(f"Content-Type must be application/json, got {self.headers.get('Content-Type')!r}")
        length = self.headers.get("Content-Length")
        if length is None or not (length.isascii() and length.isdigit()):  # "²".isdigit(), but int("²") fails
            self.close_connection = True
            raise RequestError(f"Content-Length must be the body's size in bytes, got {length!r}")
        if int(length) > limit:
            self.close_connection = True  # the unread body would otherwise be read as the next request
            raise RequestError(f"request body is {int(length)} bytes, over the limit of {limit} bytes "
                               "(the server's --max_prompt_chars sets it)")
        try:
            body = self.rfile.read(int(length))
        except TimeoutError:
            body = b""
        if len(body) < int(length):
            self.close_connection = True
            raise RequestError(f"request body ended after {len(body)} of its {length} bytes (Content-Length)")
        return body

    def _json(self, status: int, payload: Any) -> None:
        self._send(status, json_text(payload).encode(), "application/json")

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (the base class's name)
        log.info("%s %s", self.address_string(), format % args)


class Server(ThreadingHTTPServer):
    """A threading HTTP server holding the app (set before serving); IPv6 when the host is an IPv6 address."""

    daemon_threads = True  # Ctrl-C does not wait for open connections
    # each connection is a thread holding what it has read (up to 100 header lines of 64 KiB, then the body) until the
    # client finishes or goes quiet for Handler.timeout: without a bound, clients that open many and send slowly use
    # up the memory and the threads; more than this many at once are answered 503 and closed
    max_connections = 64
    app: ServeApp

    def __init__(self, host: str, port: int) -> None:
        self.private = is_loopback(host)  # then only requests naming a loopback host are answered
        self.connections, self.connections_lock = 0, threading.Lock()
        if ":" in host:
            self.address_family = socket.AF_INET6
        try:
            super().__init__((host, port), Handler)
        except OSError as err:
            # a port in use or reserved is the port's fault; an unknown name or another machine's address the host's
            hint = ("choose another --port, or --port 0 for a free one" if err.errno in (errno.EADDRINUSE, errno.EACCES)
                    else "--host must be an address or name of this machine, e.g. 127.0.0.1")
            raise OSError(f"cannot listen on {host}:{port} ({err.strerror or err}): {hint}") from None

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.connections_lock:
            refuse = self.connections >= self.max_connections
            self.connections += not refuse
        if refuse:
            body = b'{"error": "busy, try again: too many open connections"}'
            with contextlib.suppress(OSError):  # a reply only if it fits the socket's buffer: never wait for a client
                request.setblocking(False)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body))
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:  # no thread started: it will not release its place
            self._release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._release()

    def _release(self) -> None:
        with self.connections_lock:
            self.connections -= 1


def make_server(backend: Backend, host: str = "127.0.0.1", port: int = 8000, limits: Limits | None = None) -> Server:
    """A server bound to ``(host, port)`` (port 0: a free one, see ``server.server_address``), not yet serving."""
    server = Server(host, port)
    server.app = ServeApp(backend, limits or Limits())
    return server


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses, the only hosts that keep the server private to this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def main(argv: list[str] | None = None) -> None:
    """Command-line entry point (``clp serve``)."""
    parser = argparse.ArgumentParser(prog="clp serve", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("directory", nargs="?", help="a directory written by `clp export` (instead of --ckpt_path)")
    parser.add_argument("--config", action="append", default=[],
                        help="the run's YAML config(s); with a directory, only its rewards are used")
    parser.add_argument("--ckpt_path", default=None, help="checkpoint written by `clp fit`")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one")
    parser.add_argument("--max_new_tokens", type=int, default=64, help=f"response length, at most {MAX_NEW_TOKENS_CAP}")
    parser.add_argument("--max_prompt_chars", type=int, default=4000, help="longest prompt accepted, in characters")
    parser.add_argument("--max_waiting", type=int, default=4, help="requests that may queue; more are answered 503")
    parser.add_argument("--set", action="append", default=[], metavar="--KEY=VALUE",
                        help="extra override for the config, e.g. --set=--model.init_args.policy.seed=1")
    args = parser.parse_args(argv)
    if (args.directory is None) == (args.ckpt_path is None):
        parser.error("give either an exported directory or --ckpt_path (with --config), not both or neither")
    if args.ckpt_path is not None and not args.config:
        parser.error("--ckpt_path needs the run's --config to build the module")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be in [0, 65535], got {args.port}")
    if args.directory is not None and args.set:
        parser.error("--set overrides the config of a --ckpt_path run; an exported directory takes none")
    # the limits and the address are checked before any model loads (seconds to minutes)
    limits = Limits(args.max_prompt_chars, args.max_new_tokens, args.max_waiting)
    server = Server(args.host, args.port)
    try:
        if args.ckpt_path is not None:
            backend: Backend = from_checkpoint(args.config, args.ckpt_path, args.set, limits.max_new_tokens)
        else:
            backend = from_directory(args.directory, args.config, limits.max_new_tokens)
        server.app = ServeApp(backend, limits)
        host, port = server.server_address[:2]
        if not is_loopback(args.host):
            print(f"warning: listening on {args.host}, reachable from other machines; the server has no "
                  "authentication (use --host 127.0.0.1 to keep it local)")
        print(f"serving {', '.join(backend.objectives)} at http://{f'[{host}]' if ':' in host else host}:{port}/ "
              "(Ctrl-C stops)", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopped")
    finally:
        server.server_close()
