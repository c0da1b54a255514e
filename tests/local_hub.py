"""A small local Hugging Face Hub-compatible HTTP server for the test suite (stdlib only).

The real, unmodified ``huggingface_hub`` client (and transformers' ``push_to_hub`` / ``from_pretrained`` on top of it)
talks plain HTTP to this server once ``HF_ENDPOINT`` points at it, so tests exercise the whole upload and download
path, the NDJSON commit payload, the git-LFS batch protocol and the ``/resolve`` headers included, without a network.

Storage (under ``root``): one folder per repo, ``<root>/<type>s/<namespace>--<name>/`` holding ``objects/<sha256>``
(content-addressed file contents, regular and LFS alike), ``commits/<sha>.json`` (the full file manifest of each
commit) and ``refs/main`` (the head commit). A commit becomes visible only when ``refs/main`` is atomically replaced,
so a failed or rejected commit leaves the repo exactly as it was. Only the ``main`` branch (and commit shas) exist;
pull requests, Xet storage and auth are out of scope (any bearer token is accepted).
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

USER = "user"  # the namespace whoami reports and create_repo uses for ids without one
FAKE_TOKEN = "hf_localhubfaketoken"
# Like the Hub's default .gitattributes: weights and archives go through LFS, and so does anything large.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".gguf", ".npy", ".npz")
LFS_MIN_SIZE = 1_000_000
_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

_T = r"(?P<type>models|datasets|spaces)"
_P = r"(?:(?P<prefix>datasets|spaces)/)?"
_R = r"(?P<repo>[^/]+(?:/[^/]+)?)"
_REV = r"(?P<rev>[^/]+)"  # the client quotes revisions with safe="", so "refs/pr/1" arrives as one segment
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    (m, re.compile(p), h)
    for m, p, h in [
        ("GET", r"/api/whoami-v2", "whoami"),
        ("GET", r"/api/agent-harnesses", "agent_harnesses"),
        ("GET", r"/api/organizations/(?P<organization>[^/]+)/overview", "organization_overview"),
        ("POST", r"/api/validate-yaml", "validate_yaml"),
        ("POST", r"/api/repos/create", "create_repo"),
        ("GET", rf"/api/{_T}/{_R}(?:/revision/{_REV})?", "repo_info"),
        ("GET", rf"/api/{_T}/{_R}/tree/{_REV}(?:/(?P<path>.*))?", "tree"),
        ("POST", rf"/api/{_T}/{_R}/paths-info/{_REV}", "paths_info"),
        ("POST", rf"/api/{_T}/{_R}/preupload/{_REV}", "preupload"),
        ("POST", rf"/api/{_T}/{_R}/commit/{_REV}", "commit"),
        ("POST", rf"/{_P}{_R}\.git/info/lfs/objects/batch", "lfs_batch"),
        ("POST", rf"/{_P}{_R}\.git/info/lfs/objects/verify", "lfs_verify"),
        ("PUT", rf"/{_P}{_R}\.git/info/lfs/objects/(?P<oid>[0-9a-f]{{64}})", "lfs_put"),
        ("GET HEAD", rf"/{_P}{_R}/resolve/{_REV}/(?P<path>.+)", "resolve"),
    ]
]
AMBIENT_ROUTES = {"organization_overview"}
"""Requests made by any client process whatever it does, left out of ``LocalHub.requests``: importing bitsandbytes
(which peft, and so moe_zoo, imports) on a CPU with AVX512-BF16 asks the ``kernels`` package (a requirement of
transformers >= 5.25) for a Hub kernel, and kernels first checks its publisher's trust status."""


class HubError(Exception):
    """An error answer; ``code`` goes to ``X-Error-Code``, which the client maps to its typed errors."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.headers = status, message, code, headers or {}


def git_blob_oid(data: bytes) -> str:
    """The git blob sha1, which the client compares with preupload's ``oid`` to skip unchanged regular files."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def lfs_record(sha256: str, size: int) -> dict[str, Any]:
    """The manifest record of an LFS file: git sees (and names) the pointer, the client the sha256 of the content."""
    pointer = lfs_pointer(sha256, size)
    return {"sha256": sha256, "size": size, "lfs": True, "oid": git_blob_oid(pointer), "pointer_size": len(pointer)}


def _is_lfs(path: str, size: int) -> bool:
    return path.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE


def _check_path(path: str) -> str:
    if not path or path.startswith("/") or {"", ".", "..", ".git"} & set(path.rstrip("/").split("/")):
        raise HubError(400, f"Invalid path {path!r}")
    return path


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


class LocalHub:
    """The state of a running server: its storage, the request log and the failure knobs.

    ``requests`` lists ``(method, path)`` for every request (path without the query string, as sent; the
    :data:`AMBIENT_ROUTES` that any process makes on import are left out), and
    ``unknown_requests`` the ones no route matched (answered 404 and logged), to spot endpoints a new client needs.
    Set ``fail_commits = True`` to make the commit endpoint answer 500 (an interrupted push: LFS uploads still
    succeed, nothing is committed); the client does not retry commits, so it raises at once.
    """

    def __init__(self, root: Path, url: str):
        self.root, self.url = Path(root), url
        self.requests: list[tuple[str, str]] = []
        self.unknown_requests: list[tuple[str, str]] = []
        self.fail_commits = False
        self._lock = threading.Lock()

    def client_env(self, hf_home: Path) -> dict[str, str]:
        """A copy of ``os.environ`` for a client subprocess: this endpoint, online, a fresh cache, a fake token.

        huggingface_hub reads these at import time, which is why clients run in subprocesses with this env.
        """
        env = dict(os.environ)
        # Caches and token outside HF_HOME, and staging mode (which overrides HF_ENDPOINT), must not leak in.
        for key in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "TRANSFORMERS_CACHE", "HF_ASSETS_CACHE", "HF_XET_CACHE"):
            env.pop(key, None)
        env.pop("HF_TOKEN_PATH", None)
        env.pop("HUGGINGFACE_CO_STAGING", None)
        no_proxy = ",".join(filter(None, ["127.0.0.1,localhost", env.get("NO_PROXY")]))
        env.update(
            HF_ENDPOINT=self.url,
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="0",  # the CI exports HF_HUB_OFFLINE=1 and TRANSFORMERS_OFFLINE=1 globally
            TRANSFORMERS_OFFLINE="0",
            HF_DATASETS_OFFLINE="0",
            HF_TOKEN=FAKE_TOKEN,
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_XET="1",  # with hf_xet installed the client would upload through a Xet CAS server
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            HF_HUB_DISABLE_UPDATE_CHECK="1",
            NO_PROXY=no_proxy,
            no_proxy=no_proxy,
        )
        return env

    def repo_files(self, repo_id: str, repo_type: str = "model", revision: str = "main") -> dict[str, bytes]:
        """The committed files of a repo at ``revision``, path -> content."""
        repo = self.repo_dir(repo_type, repo_id)
        sha = self.resolve_revision(repo, revision)
        if sha is None:
            raise KeyError(f"{repo_type} {repo_id}@{revision} not found")
        return {p: (repo / "objects" / f["sha256"]).read_bytes() for p, f in self.manifest(repo, sha)["files"].items()}

    # --- storage -----------------------------------------------------------------------------------------------

    def repo_dir(self, repo_type: str, repo_id: str) -> Path:
        return self.root / f"{repo_type}s" / repo_id.replace("/", "--")

    def resolve_revision(self, repo: Path, revision: str) -> str | None:
        if not (repo / "refs" / "main").is_file():
            return None
        if revision in ("main", "refs/heads/main"):
            return (repo / "refs" / "main").read_text()
        is_commit = re.fullmatch(r"[0-9a-f]{40}", revision) and (repo / "commits" / f"{revision}.json").is_file()
        return revision if is_commit else None

    def manifest(self, repo: Path, sha: str) -> dict[str, Any]:
        return json.loads((repo / "commits" / f"{sha}.json").read_text())

    def store(self, repo: Path, data: bytes, lfs: bool) -> dict[str, Any]:
        """Stores ``data`` as an object and returns its manifest record (``oid`` is what git would show)."""
        sha256 = hashlib.sha256(data).hexdigest()
        if not (repo / "objects" / sha256).is_file():
            _write_atomic(repo / "objects" / sha256, data)
        return (
            lfs_record(sha256, len(data))
            if lfs
            else {"sha256": sha256, "size": len(data), "lfs": False, "oid": git_blob_oid(data)}
        )

    def write_commit(self, repo: Path, parent: str | None, files: dict[str, Any], summary: str) -> str:
        """Writes the manifest, then moves ``refs/main``: the commit is visible all at once or not at all."""
        record = {"parent": parent, "summary": summary, "date": time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())}
        record["files"] = dict(sorted(files.items()))
        data = json.dumps(record, indent=1).encode()
        sha = hashlib.sha1(data + uuid.uuid4().bytes).hexdigest()
        _write_atomic(repo / "commits" / f"{sha}.json", data)
        _write_atomic(repo / "refs" / "main", sha.encode())
        return sha


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    hub: LocalHub


class _Handler(BaseHTTPRequestHandler):
    """Routes requests to the ``h_*`` methods; each gets the route's named groups, the body and the query."""

    protocol_version = "HTTP/1.1"  # keep-alive, as the client's connection pool expects
    timeout = 60
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug(format, *args)

    def do_GET(self) -> None:
        self._dispatch()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def _read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():  # streamed file bodies may come chunked
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline().strip():  # trailers
                pass
            return b"".join(chunks)
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def _dispatch(self) -> None:
        hub = self.server.hub
        body = self._read_body()  # always drain the body so the kept-alive connection stays in sync
        url = urlsplit(self.path)
        route = self._route(url.path)
        if route is None or route[0] not in AMBIENT_ROUTES:
            hub.requests.append((self.command, url.path))
        try:
            if route is not None:
                name, match = route
                groups = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                getattr(self, f"h_{name}")(groups, body, parse_qs(url.query))
                return
            hub.unknown_requests.append((self.command, url.path))
            logger.warning("local hub: unknown request %s %s", self.command, self.path)
            raise HubError(404, f"Unknown endpoint {self.command} {url.path}")
        except HubError as err:
            headers = {"X-Error-Message": err.message, **err.headers}
            if err.code:
                headers["X-Error-Code"] = err.code
            self._send(err.status, {"error": err.message}, headers)

    def _route(self, path: str) -> tuple[str, re.Match[str]] | None:
        """The handler name and match of the first route for this method and ``path`` (``None``: unknown)."""
        for methods, pattern, name in ROUTES:
            if self.command in methods.split() and (match := pattern.fullmatch(path)):
                return name, match
        return None

    def _send(self, status: int, payload: Any = None, headers: dict[str, str] | None = None) -> None:
        """Sends bytes as they are and anything else as JSON; always with a Content-Length (keep-alive)."""
        if isinstance(payload, bytes):
            body, content_type = payload, "application/octet-stream"
        else:
            body, content_type = b"" if payload is None else json.dumps(payload).encode(), "application/json"
        self.send_response(status)
        headers = {"Content-Type": content_type, "Content-Length": str(len(body)), **(headers or {})}
        for key, value in headers.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _repo(self, g: dict[str, str]) -> tuple[str, str, Path]:
        repo_type = _TYPES[g.get("type") or g.get("prefix") or "models"]
        repo_id, repo = g["repo"], self.server.hub.repo_dir(repo_type, g["repo"])
        if ".." in repo_id or not (repo / "refs" / "main").is_file():
            raise HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")
        return repo_type, repo_id, repo

    def _files_at(self, repo: Path, rev: str) -> tuple[str, dict[str, Any]]:
        sha = self.server.hub.resolve_revision(repo, rev)
        if sha is None:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        return sha, self.server.hub.manifest(repo, sha)["files"]

    @staticmethod
    def _entry(path: str, f: dict[str, Any]) -> dict[str, Any]:
        """A tree / paths-info entry, as ``RepoFile(**entry)`` parses it."""
        entry: dict[str, Any] = {"type": "file", "path": path, "size": f["size"], "oid": f["oid"]}
        if f["lfs"]:
            entry["lfs"] = {"oid": f["sha256"], "size": f["size"], "pointerSize": f["pointer_size"]}
        return entry

    @staticmethod
    def _linked(f: dict[str, Any]) -> dict[str, str]:
        """For LFS files the client names the cached blob after X-Linked-Etag (the sha256), as on the real Hub."""
        return {"X-Linked-Etag": f'"{f["sha256"]}"', "X-Linked-Size": str(f["size"])} if f["lfs"] else {}

    # --- account and misc -----------------------------------------------------------------------------------------

    def h_whoami(self, g: dict, body: bytes, query: dict) -> None:
        auth = {"type": "access_token", "accessToken": {"displayName": "local", "role": "write"}}
        self._send(200, {"type": "user", "name": USER, "fullname": "Local User", "orgs": [], "auth": auth})

    def h_agent_harnesses(self, g: dict, body: bytes, query: dict) -> None:
        self._send(200, {"standardEnvVars": [], "harnesses": {}})  # fetched while building the user agent

    def h_organization_overview(self, g: dict, body: bytes, query: dict) -> None:
        # No organization exists here; the kernels package then falls back to its local path (see AMBIENT_ROUTES).
        raise HubError(404, f"Organization {g['organization']} not found")

    def h_validate_yaml(self, g: dict, body: bytes, query: dict) -> None:
        self._send(200, {"errors": [], "warnings": []})  # create_commit validates README.md metadata first

    def h_create_repo(self, g: dict, body: bytes, query: dict) -> None:
        payload = json.loads(body or b"{}")
        repo_type = payload.get("type") or "model"
        repo_id = f"{payload.get('organization') or USER}/{payload['name']}"
        if repo_type not in _URL_PREFIX or not re.fullmatch(r"[\w.-]+/[\w.-]+", repo_id) or ".." in repo_id:
            raise HubError(400, f"Invalid repo {repo_type} {repo_id}")
        hub = self.server.hub
        url = f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}"
        repo = hub.repo_dir(repo_type, repo_id)
        with hub._lock:
            if (repo / "refs" / "main").is_file():  # the client reads "url" from the 409 body too
                self._send(409, {"error": "You already created this repo", "url": url})
                return
            # like the real Hub, a new repo starts with one commit holding its .gitattributes
            attributes = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
            hub.write_commit(repo, None, {".gitattributes": hub.store(repo, attributes.encode(), False)}, "initial")
        self._send(200, {"url": url, "name": repo_id, "id": repo_id})

    # --- reading --------------------------------------------------------------------------------------------------

    def h_repo_info(self, g: dict, body: bytes, query: dict) -> None:
        repo_type, repo_id, repo = self._repo(g)
        sha, files = self._files_at(repo, g.get("rev", "main"))
        siblings = [{"rfilename": p, "size": f["size"], "blobId": f["oid"]} for p, f in files.items()]
        for sibling, f in zip(siblings, files.values(), strict=True):
            if f["lfs"]:
                sibling["lfs"] = {"size": f["size"], "sha256": f["sha256"], "pointerSize": f["pointer_size"]}
        date = self.server.hub.manifest(repo, sha)["date"]
        info = {"id": repo_id, "author": repo_id.split("/")[0], "sha": sha, "lastModified": date, "createdAt": date}
        self._send(200, {**info, "private": False, "disabled": False, "gated": False, "tags": [], "siblings": siblings})

    def h_tree(self, g: dict, body: bytes, query: dict) -> None:
        _, _, repo = self._repo(g)
        _, files = self._files_at(repo, g["rev"])
        base = g.get("path", "").strip("/")
        prefix = f"{base}/" if base else ""
        recursive = query.get("recursive", ["false"])[0].lower() in ("1", "true")
        entries: dict[str, dict[str, Any]] = {}
        for path, f in files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for depth in range(1, len(parts) if recursive else min(len(parts), 2)):
                folder = prefix + "/".join(parts[:depth])
                entries.setdefault(folder, {"type": "directory", "path": folder, "oid": git_blob_oid(folder.encode())})
            if recursive or len(parts) == 1:
                entries[path] = self._entry(path, f)
        if base and not entries:
            raise HubError(404, f"Entry not found: {base}", "EntryNotFound")
        self._send(200, list(entries.values()))

    def h_paths_info(self, g: dict, body: bytes, query: dict) -> None:
        _, _, repo = self._repo(g)
        _, files = self._files_at(repo, g["rev"])
        folders = {path.rsplit("/", depth)[0] for path in files for depth in range(1, path.count("/") + 1)}
        entries = []
        for path in parse_qs(body.decode()).get("paths", []):
            if path in files:
                entries.append(self._entry(path, files[path]))
            elif path.strip("/") in folders:
                entries.append({"type": "directory", "path": path.strip("/"), "oid": git_blob_oid(path.encode())})
        self._send(200, entries)

    def h_resolve(self, g: dict, body: bytes, query: dict) -> None:
        """Serves a file with the headers hf_hub_download needs: commit, etags (sha256 for LFS) and sizes."""
        _, _, repo = self._repo(g)
        sha, files = self._files_at(repo, g["rev"])
        f = files.get(g["path"])
        if f is None:  # X-Repo-Commit lets the client cache the miss, as transformers' optional-file probes rely on
            raise HubError(404, f"Entry not found: {g['path']}", "EntryNotFound", {"X-Repo-Commit": sha})
        headers = {"X-Repo-Commit": sha, "ETag": f'"{f["oid"]}"', "Accept-Ranges": "bytes"}
        if self.command == "HEAD":  # the metadata call: sizes and etags only
            self._send(200, b"", {**headers, "Content-Length": str(f["size"])} | self._linked(f))
            return
        data = (repo / "objects" / f["sha256"]).read_bytes()
        headers |= self._linked(f)
        status = 200
        if match := re.fullmatch(r"bytes=(\d+)-(\d*)", self.headers.get("Range", "")):  # resumed downloads
            start, end = int(match[1]), int(match[2]) if match[2] else len(data) - 1
            headers["Content-Range"] = f"bytes {start}-{min(end, len(data) - 1)}/{len(data)}"
            data, status = data[start : end + 1], 206
        self._send(status, data, headers)

    # --- writing --------------------------------------------------------------------------------------------------

    def h_preupload(self, g: dict, body: bytes, query: dict) -> None:
        """Decides regular vs LFS per file and returns the current oid so the client can skip unchanged files."""
        _, _, repo = self._repo(g)
        _, files = self._files_at(repo, g["rev"])
        answer = []
        for item in json.loads(body)["files"]:
            mode = "lfs" if _is_lfs(item["path"], item["size"]) else "regular"
            current = files.get(item["path"])
            oid = None if current is None else current["sha256"] if current["lfs"] else current["oid"]
            answer.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": answer, "commitOid": self.server.hub.resolve_revision(repo, g["rev"])})

    def h_lfs_batch(self, g: dict, body: bytes, query: dict) -> None:
        """git-lfs batch API, basic transfer: upload actions point back at this server unless the object exists."""
        repo_type, repo_id, repo = self._repo(g)
        payload = json.loads(body)
        if payload.get("operation") != "upload":
            raise HubError(400, "Only the upload operation is supported")
        base = f"{self.server.hub.url}/{_URL_PREFIX[repo_type]}{repo_id}.git/info/lfs/objects"
        objects = []
        for obj in payload["objects"]:
            oid, size = obj["oid"], obj["size"]
            path = repo / "objects" / oid
            if not re.fullmatch(r"[0-9a-f]{64}", oid):
                objects.append({"oid": oid, "size": size, "error": {"code": 422, "message": "Invalid oid"}})
            elif path.is_file() and path.stat().st_size == size:
                objects.append({"oid": oid, "size": size, "authenticated": True})  # no actions: already uploaded
            else:
                upload, verify = {"href": f"{base}/{oid}", "header": {}}, {"href": f"{base}/verify", "header": {}}
                objects.append(
                    {"oid": oid, "size": size, "authenticated": True, "actions": {"upload": upload, "verify": verify}}
                )
        answer = {"transfer": "basic", "objects": objects, "hash_algo": "sha256"}
        self._send(200, answer, {"Content-Type": "application/vnd.git-lfs+json"})

    def h_lfs_put(self, g: dict, body: bytes, query: dict) -> None:
        _, _, repo = self._repo(g)
        if hashlib.sha256(body).hexdigest() != g["oid"]:
            raise HubError(400, f"sha256 mismatch for LFS object {g['oid']}")
        _write_atomic(repo / "objects" / g["oid"], body)
        self._send(200)

    def h_lfs_verify(self, g: dict, body: bytes, query: dict) -> None:
        _, _, repo = self._repo(g)
        obj = json.loads(body)
        path = repo / "objects" / obj["oid"]
        if not (path.is_file() and path.stat().st_size == obj["size"]):
            raise HubError(404, f"LFS object {obj['oid']} not found")
        self._send(200, {"message": "ok"})

    def h_commit(self, g: dict, body: bytes, query: dict) -> None:
        """Applies an NDJSON commit (header, file, lfsFile, deletedFile, deletedFolder lines) atomically."""
        repo_type, repo_id, repo = self._repo(g)
        hub = self.server.hub
        if hub.fail_commits:
            raise HubError(500, "Simulated failure: commit rejected by the local hub")
        if query.get("create_pr", ["0"])[0] not in ("0", "false"):
            raise HubError(400, "Pull requests are not supported by the local hub")
        if g["rev"] not in ("main", "refs/heads/main"):
            raise HubError(404, f"Invalid rev id: {g['rev']} (only main can take commits)", "RevisionNotFound")
        lines = [json.loads(line) for line in body.splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise HubError(400, "The commit payload must start with a header line")
        header = lines[0]["value"]
        with hub._lock:
            head, files = self._files_at(repo, "main")
            if header.get("parentCommit") not in (None, head):
                raise HubError(412, f"Parent commit {header['parentCommit']} is not the head {head}")
            for line in lines[1:]:
                key, value = line.get("key"), line.get("value", {})
                path = _check_path(value.get("path", ""))
                if key == "file":
                    files[path] = hub.store(repo, base64.b64decode(value["content"]), False)
                elif key == "lfsFile":
                    obj = repo / "objects" / value["oid"]
                    if not re.fullmatch(r"[0-9a-f]{64}", value["oid"]) or not obj.is_file():
                        raise HubError(400, f"LFS object {value['oid']} for {path} was not uploaded")
                    files[path] = lfs_record(value["oid"], obj.stat().st_size)
                elif key == "deletedFile":
                    if files.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif key == "deletedFolder":
                    inside = [p for p in files if p.startswith(path.rstrip("/") + "/")]
                    if not inside:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in inside:
                        del files[p]
                else:
                    raise HubError(400, f"Unknown commit operation {key!r}")
            sha = hub.write_commit(repo, head, files, header.get("summary", ""))
        url = f"{hub.url}/{_URL_PREFIX[repo_type]}{repo_id}/commit/{sha}"
        self._send(200, {"success": True, "commitOid": sha, "commitUrl": url, "hookOutput": "", "pullRequestUrl": None})


@contextmanager
def serve_local_hub(root: Path) -> Iterator[LocalHub]:
    """Runs the server on ``127.0.0.1`` (a free port) in a daemon thread, storing repos under ``root``."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.hub = LocalHub(root, f"http://127.0.0.1:{server.server_address[1]}")
    thread = threading.Thread(target=server.serve_forever, name="local-hub", daemon=True)
    thread.start()
    try:
        yield server.hub
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
