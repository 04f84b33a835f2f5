"""A local stand-in for the few Hugging Face Hub endpoints that `create_repo` + `upload_folder` use.

It speaks plain HTTP on 127.0.0.1 (a random free port) and keeps what it receives in memory, so
tests can check every uploaded file byte for byte without any network.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

REPO = r"(?P<repo>[^/]+/[^/]+|[^/]+)"


class FakeHub:
    """Records requests (headers lower-cased); stores repos and committed files: `hub.files[repo_id][path] = bytes`."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str, dict[str, str]]] = []
        self.repos: dict[str, dict[str, Any]] = {}
        self.files: dict[str, dict[str, bytes]] = {}
        self.commits: list[dict[str, Any]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:  # keep test output clean
                pass

            def _reply(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                body = self.rfile.read(length) if length else b""
                path = self.path.split("?")[0]
                hub.requests.append(("POST", path, {k.lower(): v for k, v in self.headers.items()}))
                base = f"http://{self.server.server_address[0]}:{self.server.server_address[1]}"
                if path == "/api/repos/create":
                    payload = json.loads(body)
                    repo_id = "/".join(p for p in (payload.get("organization"), payload["name"]) if p)
                    hub.repos[repo_id] = payload
                    hub.files.setdefault(repo_id, {})
                    return self._reply(200, {"url": f"{base}/{repo_id}"})
                if path == "/api/validate-yaml":
                    return self._reply(200, {})
                if match := re.fullmatch(rf"/api/models/{REPO}/preupload/(?P<rev>[^/]+)", path):
                    if match["repo"] not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    files = json.loads(body)["files"]
                    # "regular": file contents travel base64-encoded inside the commit, no LFS/xet round trip.
                    modes = [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]
                    return self._reply(200, {"files": modes})
                if match := re.fullmatch(rf"/api/models/{REPO}/commit/(?P<rev>[^/]+)", path):
                    repo_id = match["repo"]
                    if repo_id not in hub.repos:
                        return self._reply(404, {"error": "Repository not found"})
                    lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
                    header = next(line["value"] for line in lines if line["key"] == "header")
                    for line in lines:
                        if line["key"] == "file":
                            value = line["value"]
                            hub.files[repo_id][value["path"]] = base64.b64decode(value["content"])
                    hub.commits.append({"repo_id": repo_id, "summary": header.get("summary"), "lines": len(lines)})
                    oid = f"{len(hub.commits):040x}"
                    return self._reply(
                        200, {"commitUrl": f"{base}/{repo_id}/commit/{oid}", "commitOid": oid, "pullRequestUrl": None}
                    )
                return self._reply(404, {"error": f"not faked: POST {path}"})

            def do_GET(self) -> None:
                hub.requests.append(("GET", self.path, {k.lower(): v for k, v in self.headers.items()}))
                self._reply(404, {"error": f"not faked: GET {self.path}"})

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
