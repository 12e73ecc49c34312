"""A read-only stand-in for the Hugging Face Hub on 127.0.0.1, serving folders under their hub ids.

It speaks the part of the hub's HTTP API that `huggingface_hub.snapshot_download` / `hf_hub_download`,
`HfFileSystem` and `datasets.load_dataset(..., streaming=True)` use: repo info, tree listings, paths-info,
and file downloads (`resolve`, with HEAD, ETag, X-Repo-Commit and byte ranges). Point `HF_ENDPOINT` at it
and the libraries' real download and streaming code runs, as on Colab. For tests: nothing is uploaded,
there are no branches but `main`, and every repo is public.

    root/models/<owner>/<name>/...      served as the model repo <owner>/<name>
    root/datasets/<owner>/<name>/...    served as the dataset repo <owner>/<name>

The web images beside them (`root/web/<host>/<path>`) are served by `tests.hub.web_proxy`, as https.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

log = logging.getLogger(__name__)

KINDS = {"models": "models", "datasets": "datasets", "spaces": "spaces"}
SKIP = {"llava_nb_manifest.json"}  # the cache's own bookkeeping is not part of a repo


class HubRepos:
    """The repos under `root`: their files, a commit sha per repo, and a content sha per file."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        self._sha: dict[Path, str] = {}
        self._lock = threading.Lock()

    def folder(self, kind: str, repo_id: str) -> Path | None:
        folder = self.root / kind / repo_id
        return folder if repo_id.count("/") == 1 and folder.is_dir() else None

    def files(self, folder: Path) -> list[str]:
        return sorted(
            str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file() and p.name not in SKIP
        )

    def file_sha(self, path: Path) -> str:
        """git-style content id of a file (the hub's ETag for small files, sha256 for large ones)."""
        with self._lock:
            if path not in self._sha:
                self._sha[path] = hashlib.sha256(path.read_bytes()).hexdigest()
            return self._sha[path]

    def commit(self, folder: Path) -> str:
        """A 40-hex commit id that changes whenever a file of the repo does."""
        listing = "\n".join(
            f"{f}:{(folder / f).stat().st_size}:{(folder / f).stat().st_mtime_ns}" for f in self.files(folder)
        )
        return hashlib.sha1(listing.encode()).hexdigest()

    def entry(self, folder: Path, path: str, expand: bool = False) -> dict:
        full = folder / path
        if full.is_dir():
            return {"type": "directory", "oid": hashlib.sha1(path.encode()).hexdigest(), "path": path}
        sha = self.file_sha(full)
        out = {
            "type": "file",
            "oid": sha[:40],
            "size": full.stat().st_size,
            "path": path,
            "lfs": {"oid": sha, "size": full.stat().st_size, "pointerSize": 134},
        }
        if expand:
            out["lastCommit"] = {
                "id": self.commit(folder),
                "title": "twin",
                "date": "2026-01-01T00:00:00.000Z",
            }
        return out


def _handler(repos: HubRepos) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            log.debug("hub twin: " + format, *args)

        # ---------------------------------------------------------------------------- routing
        def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
            self._route(head=True)

        def do_GET(self) -> None:  # noqa: N802
            self._route(head=False)

        def do_POST(self) -> None:  # noqa: N802
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            url = urllib.parse.urlsplit(self.path)
            m = re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/paths-info/([^/]+)", url.path)
            if not m:
                return self._error(404, "EntryNotFound", f"no such route: POST {url.path}")
            folder = self._repo(m[1], m[2], m[3])
            if folder is None:
                return
            if "json" in (self.headers.get("Content-Type") or ""):
                form = json.loads(body or b"{}")
                paths, expand = form.get("paths", []), bool(form.get("expand"))
            else:
                form = urllib.parse.parse_qs(body.decode())
                paths, expand = form.get("paths", []), form.get("expand", ["false"])[0] == "true"
            found = [
                repos.entry(folder, p.strip("/"), expand) for p in paths if (folder / p.strip("/")).exists()
            ]
            self._json(found)

        def _route(self, head: bool) -> None:
            url = urllib.parse.urlsplit(self.path)
            path = urllib.parse.unquote(url.path)
            query = urllib.parse.parse_qs(url.query)
            if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)(?:/revision/(.+))?", path):
                return self._info(m[1], m[2], m[3] or "main")
            if m := re.fullmatch(r"/api/(models|datasets|spaces)/([^/]+/[^/]+)/tree/([^/]+)(?:/(.*))?", path):
                return self._tree(m[1], m[2], m[3], m[4] or "", query)
            if m := re.fullmatch(r"/(?:(datasets|spaces)/)?([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path):
                return self._file(m[1] or "models", m[2], m[3], m[4], head)
            self._error(404, "EntryNotFound", f"no such route: {path}")

        # -------------------------------------------------------------------------- endpoints
        def _repo(self, kind: str, repo_id: str, revision: str) -> Path | None:
            folder = repos.folder(KINDS[kind], repo_id)
            if folder is None:
                self._error(404, "RepositoryNotFound", f"Repository Not Found for url: {self.path}")
                return None
            if revision not in ("main", repos.commit(folder)):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
                return None
            return folder

        def _info(self, kind: str, repo_id: str, revision: str) -> None:
            folder = self._repo(kind, repo_id, revision)
            if folder is None:
                return
            files = repos.files(folder)
            owner = repo_id.split("/")[0]
            self._json(
                {
                    "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
                    "id": repo_id,
                    "author": owner,
                    "sha": repos.commit(folder),
                    "private": False,
                    "gated": False,
                    "disabled": False,
                    "lastModified": "2026-01-01T00:00:00.000Z",
                    "createdAt": "2026-01-01T00:00:00.000Z",
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "cardData": {},
                    "siblings": [{"rfilename": f, "size": (folder / f).stat().st_size} for f in files],
                    "usedStorage": sum((folder / f).stat().st_size for f in files),
                }
            )

        def _tree(self, kind: str, repo_id: str, revision: str, sub: str, query: dict) -> None:
            folder = self._repo(kind, repo_id, revision)
            if folder is None:
                return
            base = folder / sub.strip("/")
            if not base.is_dir():
                return self._error(404, "EntryNotFound", f"{sub} does not exist on main")
            recursive = query.get("recursive", ["false"])[0].lower() == "true"
            expand = query.get("expand", ["false"])[0].lower() == "true"
            children = base.rglob("*") if recursive else base.iterdir()
            entries = [
                repos.entry(folder, str(p.relative_to(folder)), expand)
                for p in sorted(children)
                if p.name not in SKIP
            ]
            self._json(entries)

        def _file(self, kind: str, repo_id: str, revision: str, name: str, head: bool) -> None:
            folder = self._repo(kind, repo_id, revision)
            if folder is not None:
                self._send_file(folder, name, head, repos.commit(folder))

        def _send_file(self, folder: Path, name: str, head: bool, commit: str) -> None:
            path = folder / name
            if not path.is_file() or path.name in SKIP or folder.resolve() not in path.resolve().parents:
                return self._error(404, "EntryNotFound", f"{name} does not exist in {folder.name}")
            size = path.stat().st_size
            start, end, status = 0, size - 1, 200
            if (rng := self.headers.get("Range")) and (m := re.fullmatch(r"bytes=(\d*)-(\d*)", rng.strip())):
                if m[1]:
                    start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
                else:  # the last N bytes (parquet readers ask for the footer this way)
                    start = max(size - int(m[2]), 0)
                status = 206
                if start >= size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
            self.send_response(status)
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(end - start + 1))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{repos.file_sha(path)}"')
            if commit:
                self.send_header("X-Repo-Commit", commit)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
            self.end_headers()
            if not head:
                with open(path, "rb") as f:
                    f.seek(start)
                    self.wfile.write(f.read(end - start + 1))

        # ---------------------------------------------------------------------------- replies
        def _json(self, obj: object) -> None:
            payload = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

        def _error(self, code: int, error_code: str, message: str) -> None:
            payload = json.dumps({"error": message}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", error_code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(payload)

    return Handler


@contextlib.contextmanager
def serve(root: str | os.PathLike, port: int = 0) -> Iterator[str]:
    """Serve `root` on 127.0.0.1 (any free port by default) in a thread; yields the endpoint URL."""
    server = ThreadingHTTPServer(("127.0.0.1", port), _handler(HubRepos(root)))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, name="hub-twin", daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
