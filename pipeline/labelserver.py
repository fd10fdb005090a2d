"""The labeling page: people rank the policy's samples in a browser (`python -m pipeline label --serve`).

A small stdlib HTTP server (ThreadingHTTPServer, one thread per request) serves a static page
(pipeline/labelpage/) and a JSON API:

    GET  /api/next?labeler=ID   the item this labeler should rank now (leased to them), and progress
    POST /api/submit            {"labeler", "id", "ranks", "flag"}: append the ranking, answer the progress
    POST /api/skip              {"labeler", "id", "flag"}: release the item; with a flag, record it as flagged

Guarantees:
- **Durable, one line per submission.** A ranking is appended to the rankings file as one line and fsynced
  before the page hears "saved" (pipeline/labeling.append_jsonl), under a lock; a killed server loses at most
  the items on screen, and a half-written last line is cut when the server starts again.
- **Resume.** Items already in the rankings file (or flagged) are never served again; reloading the page shows
  the same item, the labeler's lease, until it is ranked or skipped.
- **Several labelers, one file.** An item is leased to one labeler at a time; a lease lasts `lease_s` seconds
  (renewed by asking again) and is released by a skip or by expiry. A submission for an item someone else
  holds now, or that is already ranked, is refused (409) instead of written twice.
- **Model text is data, never markup.** The API is JSON and the page writes every model string with
  textContent; the Content-Security-Policy allows only the page's own script file, so even an injected inline
  script could not run. POSTs must be `application/json` (a cross-site form cannot send that without a CORS
  preflight, which this server never grants) and, on a loopback address, carry a loopback Host header (no DNS
  rebinding).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import defaultdict
from collections.abc import Callable
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from pipeline.data import DataError, ranking_problem
from pipeline.labeling import append_jsonl, read_jsonl, read_to_label, repair_tail
from pipeline.tinytask import dense_ranks

log = logging.getLogger(__name__)

PAGE_DIR = Path(__file__).with_name("labelpage")
STATIC = {"/": ("index.html", "text/html; charset=utf-8"), "/app.js": ("app.js", "text/javascript; charset=utf-8"),
          "/style.css": ("style.css", "text/css; charset=utf-8")}
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'none'; "
       "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
MAX_BODY = 1 << 20
MAX_FLAG = 2000


class Refused(Exception):
    """A request the store cannot honour; `status` is the HTTP status the page gets with the message."""

    def __init__(self, status: HTTPStatus, message: str) -> None:
        super().__init__(message)
        self.status = status


def flagged_path(output: Path) -> Path:
    """Where flagged-and-skipped items go: beside the rankings file (rankings.jsonl -> rankings.flagged.jsonl)."""
    return output.with_name(output.stem + ".flagged.jsonl")


class LabelStore:
    """The items, the rankings file they go to, and who holds which item; every method is thread-safe."""

    def __init__(self, to_label: Path, output: Path, lease_s: float = 900.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.items = read_to_label(to_label)
        self.by_id = {item["id"]: item for item in self.items}
        self.output, self.flagged = output, flagged_path(output)
        self.lease_s, self.clock = lease_s, clock
        self.lock = threading.Lock()
        self.leases: dict[str, tuple[str, float]] = {}  # item id -> (labeler, expiry)
        self.skipped: dict[str, set[str]] = defaultdict(set)  # labeler -> items they skipped (served last)
        self.done: set[str] = set()
        self.per_labeler: dict[str, int] = defaultdict(int)
        foreign = 0
        for path in (self.output, self.flagged):
            cut = repair_tail(path)
            if cut:
                log.warning("%s: cut a half-written last line (%d bytes) left by a killed server", path, cut)
            if not path.is_file():
                continue
            for _, row in read_jsonl(path):
                rid = row.get("id") if isinstance(row, dict) else None
                if rid in self.by_id:
                    self.done.add(rid)
                    self.per_labeler[str(row.get("labeler"))] += path == self.output
                else:
                    foreign += 1
        if foreign:
            log.warning("%s: %d rows are not items of %s (another to-label file): they stay, and are not counted",
                        self.output, foreign, to_label)

    # -- queries

    def progress(self, labeler: str | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {"done": len(self.done), "total": len(self.items)}
        if labeler is not None:
            out["mine"] = self.per_labeler.get(labeler, 0)
        return out

    def _expire(self) -> None:
        now = self.clock()
        for item_id in [i for i, (_, until) in self.leases.items() if until <= now]:
            del self.leases[item_id]

    def next_item(self, labeler: str) -> dict[str, Any]:
        """The labeler's current item (the one they hold, else the first free one they have not skipped)."""
        labeler = _labeler(labeler)
        with self.lock:
            self._expire()
            held = [i for i, (who, _) in self.leases.items() if who == labeler and i not in self.done]
            free = [it["id"] for it in self.items if it["id"] not in self.done and it["id"] not in self.leases]
            fresh = [i for i in free if i not in self.skipped[labeler]]
            choice = held[0] if held else (fresh or free or [None])[0]
            if choice is not None:
                self.leases[choice] = (labeler, self.clock() + self.lease_s)
            item = self.by_id[choice] if choice else None
            public = {k: item[k] for k in ("id", "prompt", "completions", "ended")} if item else None
            return {"item": public, "progress": self.progress(labeler)}

    # -- updates

    def _check_holder(self, labeler: str, item_id: Any) -> dict[str, Any]:
        if not isinstance(item_id, str) or item_id not in self.by_id:
            raise Refused(HTTPStatus.NOT_FOUND, f"no item {item_id!r} in this to-label file")
        if item_id in self.done:
            raise Refused(HTTPStatus.CONFLICT, "this item has already been ranked; here is the next one")
        self._expire()
        holder = self.leases.get(item_id)
        if holder is not None and holder[0] != labeler:
            raise Refused(HTTPStatus.CONFLICT, "your hold on this item expired and another labeler has it now")
        return self.by_id[item_id]

    def submit(self, labeler: str, item_id: Any, ranks: Any, flag: Any = "") -> dict[str, Any]:
        labeler, flag = _labeler(labeler), _flag(flag)
        with self.lock:
            item = self._check_holder(labeler, item_id)
            if not isinstance(ranks, list) or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranks):
                raise Refused(HTTPStatus.BAD_REQUEST, "ranks must be a list of whole numbers")
            row: dict[str, Any] = {"id": item_id, "prompt": item["prompt"], "completions": item["completions"],
                                   "ranks": ranks}
            problem = ranking_problem(row)  # the reward model's loader's own rules
            if problem:
                raise Refused(HTTPStatus.BAD_REQUEST, problem)
            row["ranks"] = dense_ranks([-r for r in ranks])  # 1, 1, 3 -> 1, 1, 2: only the order matters
            row["labeler"] = labeler
            if flag:
                row["flag"] = flag
            row["time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            append_jsonl(self.output, row)
            self.done.add(item_id)
            self.leases.pop(item_id, None)
            self.per_labeler[labeler] += 1
            return {"saved": item_id, "progress": self.progress(labeler)}

    def skip(self, labeler: str, item_id: Any, flag: Any = "") -> dict[str, Any]:
        """Release the item. With a flag (unsafe, broken) it is recorded as flagged and not served again."""
        labeler, flag = _labeler(labeler), _flag(flag)
        with self.lock:
            item = self._check_holder(labeler, item_id)
            self.leases.pop(item_id, None)
            if flag:
                append_jsonl(self.flagged, {"id": item_id, "prompt": item["prompt"],
                                            "completions": item["completions"], "labeler": labeler, "flag": flag,
                                            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
                self.done.add(item_id)
            else:
                self.skipped[labeler].add(item_id)
            return {"skipped": item_id, "flagged": bool(flag), "progress": self.progress(labeler)}


def _labeler(value: Any) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > 64:
        raise Refused(HTTPStatus.BAD_REQUEST, "enter your labeler id (1 to 64 characters) first")
    return value.strip()


def _flag(value: Any) -> str:
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > MAX_FLAG:
        raise Refused(HTTPStatus.BAD_REQUEST, f"the flag must be text of at most {MAX_FLAG} characters")
    return value.strip()


# --------------------------------------------------------------------------------------------- HTTP


def make_handler(store: LabelStore, allowed_hosts: set[str] | None) -> type[BaseHTTPRequestHandler]:
    """A request handler bound to `store`; `allowed_hosts` (None = any) are the Host headers accepted."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "pipeline-labeling"
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # the stdlib prints every request to stderr
            log.debug("%s %s", self.address_string(), format % args)

        def _send(self, status: HTTPStatus, body: bytes, content_type: str) -> None:
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Security-Policy", CSP)
            self.send_header("X-Content-Type-Options", "nosniff")
            self.send_header("Referrer-Policy", "no-referrer")
            self.send_header("Cache-Control", "no-store")
            self.end_headers()
            self.wfile.write(body)

        def _json(self, status: HTTPStatus, data: dict[str, Any]) -> None:
            self._send(status, json.dumps(data).encode(), "application/json")

        def _host_ok(self) -> bool:
            if allowed_hosts is None or self.headers.get("Host", "") in allowed_hosts:
                return True
            self._json(HTTPStatus.FORBIDDEN, {"error": "unexpected Host header"})
            return False

        def do_GET(self) -> None:
            if not self._host_ok():
                return
            url = urlsplit(self.path)
            if url.path in STATIC:
                name, content_type = STATIC[url.path]
                self._send(HTTPStatus.OK, (PAGE_DIR / name).read_bytes(), content_type)
                return
            query = parse_qs(url.query)
            labeler = query.get("labeler", [""])[0]
            try:
                if url.path == "/api/next":
                    self._json(HTTPStatus.OK, store.next_item(labeler))
                elif url.path == "/api/progress":
                    with store.lock:
                        self._json(HTTPStatus.OK, {"progress": store.progress(labeler or None)})
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no such page: {url.path}"})
            except Refused as e:
                self._json(e.status, {"error": str(e)})

        def do_POST(self) -> None:
            if not self._host_ok():
                return
            if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/json":
                self._json(HTTPStatus.UNSUPPORTED_MEDIA_TYPE, {"error": "send application/json"})
                return
            length = int(self.headers.get("Content-Length") or 0)
            if length > MAX_BODY:
                self._json(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, {"error": "request too large"})
                return
            try:
                body = json.loads(self.rfile.read(length) or b"{}")
                if not isinstance(body, dict):
                    raise ValueError("not an object")
            except ValueError:
                self._json(HTTPStatus.BAD_REQUEST, {"error": "the body must be a JSON object"})
                return
            path = urlsplit(self.path).path
            try:
                if path == "/api/submit":
                    result = store.submit(body.get("labeler"), body.get("id"), body.get("ranks"), body.get("flag"))
                elif path == "/api/skip":
                    result = store.skip(body.get("labeler"), body.get("id"), body.get("flag"))
                else:
                    self._json(HTTPStatus.NOT_FOUND, {"error": f"no such endpoint: {path}"})
                    return
            except Refused as e:
                self._json(e.status, {"error": str(e)})
                return
            self._json(HTTPStatus.OK, result)

    return Handler


def make_server(store: LabelStore, host: str = "127.0.0.1", port: int = 8765) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0 picks a free one: see `server.server_address`)."""
    server = ThreadingHTTPServer((host, port), make_handler(store, None))
    server.daemon_threads = True
    bound = server.server_address[1]
    if host in ("127.0.0.1", "localhost", "::1"):
        allowed = {f"{name}:{bound}" for name in ("127.0.0.1", "localhost", "[::1]")}
        server.RequestHandlerClass = make_handler(store, allowed)
    return server


def serve(to_label: Path, output: Path, host: str, port: int, lease_s: float) -> None:
    """Serve the labeling page until Ctrl-C."""
    if not to_label.is_file():
        raise DataError(f"{to_label}: file not found: build it with `make label ARGS=\"label.labeler=human\"` "
                        "(or pass --input)")
    store = LabelStore(to_label, output, lease_s)
    server = make_server(store, host, port)
    shown = f"[{host}]" if ":" in host else host
    print(f"labeling {to_label} ({store.progress()['done']} of {len(store.items)} items done) into {output}\n"
          f"open http://{shown}:{server.server_address[1]}/ (Ctrl-C stops; every submitted item is already "
          "saved)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
    print(f"stopped: {store.progress()['done']} of {len(store.items)} items done, rankings in {output}")
