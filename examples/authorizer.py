#!/usr/bin/env python3
"""Minimal external authorizer for h8d in side-car mode.

Serves HTTP on a Unix socket and answers h8d's per-stream question
``POST /v1/authorize`` from an allow list. Standard library only
(Python 3.11 or later for TOML allow lists; JSON works on 3.8).

    python3 examples/authorizer.py --socket /run/h8/authz.sock --allow allow.json

The allow list is read again on every request, so edits apply to the next
decision h8d does not have cached. A file that cannot be read or parsed
makes every request fail with 500, and h8d then applies its configured
fallback. JSON form::

    {"allow": [{"peer": "server-a", "services": ["echo", "metrics"]},
               {"peer": "*", "services": ["health"]}]}

TOML form (file name ending in .toml)::

    [[allow]]
    peer = "server-a"
    services = ["echo", "metrics"]

``"*"`` matches any peer or any service. An entry may also set
``local_server`` to apply only on the daemon of that name.

See docs/SIDECAR.md for the protocol.
"""

import argparse
import http.server
import json
import os
import signal
import socketserver
import sys

MAX_BODY_BYTES = 64 * 1024
REQUEST_FIELDS = ("peer", "client_id", "source_id", "service", "local_server")


def load_allow_list(path):
    """Return the list of allow entries in ``path`` (JSON, or TOML by extension)."""
    with open(path, "rb") as file:
        data = file.read()
    if path.endswith(".toml"):
        import tomllib  # Python 3.11+

        document = tomllib.loads(data.decode("utf-8"))
    else:
        document = json.loads(data)
    entries = document.get("allow", [])
    if not isinstance(entries, list):
        raise ValueError("`allow` must be a list of entries")
    for entry in entries:
        if not isinstance(entry, dict) or not isinstance(entry.get("peer"), str):
            raise ValueError(f"allow entry {entry!r} needs a string `peer`")
        services = entry.get("services")
        if not isinstance(services, list) or not all(isinstance(s, str) for s in services):
            raise ValueError(f"allow entry {entry!r} needs a list of strings `services`")
    return entries


def decide(entries, request):
    """Return ``(allow, reason)`` for one h8d request."""
    for index, entry in enumerate(entries):
        if entry["peer"] not in ("*", request["peer"]):
            continue
        if entry.get("local_server", request["local_server"]) != request["local_server"]:
            continue
        if "*" in entry["services"] or request["service"] in entry["services"]:
            return True, f"allow entry {index}"
    return False, f"no allow entry for peer {request['peer']!r} and service {request['service']!r}"


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    allow_path = None  # set in main()

    def do_POST(self):
        if self.path != "/v1/authorize":
            self.reply(404, {"error": f"unknown path {self.path}; use POST /v1/authorize"})
            return
        try:
            length = int(self.headers.get("Content-Length", "0"))
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY_BYTES:
            self.reply(400, {"error": "missing or invalid Content-Length"})
            return
        try:
            request = json.loads(self.rfile.read(length))
            if not isinstance(request, dict) or not all(
                isinstance(request.get(field), str) for field in REQUEST_FIELDS
            ):
                raise ValueError(f"expected string fields {', '.join(REQUEST_FIELDS)}")
        except ValueError as error:
            self.reply(400, {"error": f"invalid request: {error}"})
            return
        try:
            entries = load_allow_list(self.allow_path)
        except (OSError, ValueError) as error:
            self.log_message("cannot load the allow list %s: %s", self.allow_path, error)
            self.reply(500, {"error": "the allow list cannot be loaded"})
            return
        allow, reason = decide(entries, request)
        self.log_message(
            "%s %s/%s -> %s (%s)",
            "allow" if allow else "deny",
            request["peer"],
            request["service"],
            request["local_server"],
            reason,
        )
        self.reply(200, {"allow": allow, "reason": reason})

    def reply(self, status, document):
        body = json.dumps(document).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(body)
        self.close_connection = True

    def log_message(self, format, *args):
        # Unix-socket clients have no address; the default would fail on it.
        sys.stderr.write("authorizer: " + (format % args) + "\n")


class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--socket", required=True, help="Unix socket to listen on")
    parser.add_argument("--allow", required=True, help="allow list, JSON or .toml")
    args = parser.parse_args()

    load_allow_list(args.allow)  # fail at start on a broken file
    Handler.allow_path = args.allow
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    server = Server(args.socket, Handler)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    print(f"authorizer: listening on {args.socket}", file=sys.stderr, flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
        os.unlink(args.socket)


if __name__ == "__main__":
    main()
