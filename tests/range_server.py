"""A local HTTP server for tests: serves a directory with Range requests
(what fsspec's HTTP file system sends) and counts what it served."""

from __future__ import annotations

import http.server
import os
import re
import sys
import threading
import time

_RANGE = re.compile(r"bytes=(\d+)-(\d*)$")


class RangeServer:
    """``with RangeServer(directory) as server: server.url("x.jjpg")``.

    ``bytes_served`` counts body bytes sent; ``max_in_flight`` is the most GET
    requests being answered at once; ``ranges`` lists (start, end) per GET.
    """

    def __init__(self, directory):
        self.directory = os.fspath(directory)
        self.bytes_served = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.ranges: list[tuple[int, int]] = []
        self.fail_ranged_reads = False  # answer ranged GETs with 500
        self.ignore_ranges = False      # answer every GET with the whole file (200)
        self.delay_s = 0.0              # each GET held this long while counted in flight
        self.stall_from = None          # GETs of ranges at least this long stall (for good)
        self.stalled = 0                # GETs stalling now
        self.status = None              # answer every request with this HTTP error
        self.failing = None             # (regex, status): requests whose path matches get it
        self.missing_status = 404       # for files that are not there (S3 answers 403)
        self.range_cap = None           # answer at most this many bytes of a range
        self.range_headers = []         # every GET's Range header, as sent
        self._lock = threading.Lock()
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                self._answer(body=False)

            def do_GET(self):
                with server._lock:
                    server.range_headers.append(self.headers.get("Range"))
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                try:
                    if server.delay_s:
                        # a slow server: requests a client sends at once overlap
                        # whatever the scheduler does (a loaded CI machine)
                        time.sleep(server.delay_s)
                    if server.stall_from is not None and self._range_length() >= server.stall_from:
                        with server._lock:
                            server.stalled += 1
                        time.sleep(3600)   # a daemon thread: the server closes without it
                    self._answer(body=True)
                finally:
                    with server._lock:
                        server.in_flight -= 1

            def _range_length(self) -> int:
                match = _RANGE.match(self.headers.get("Range", ""))
                if not match or not match.group(2):
                    return 0
                return int(match.group(2)) + 1 - int(match.group(1))

            def _answer(self, body: bool):
                if server.status is not None:
                    self.send_error(server.status)
                    return
                if server.failing is not None and re.search(server.failing[0], self.path):
                    self.send_error(server.failing[1])
                    return
                path = os.path.join(server.directory, self.path.lstrip("/").split("?")[0])
                if not os.path.isfile(path):
                    self.send_error(server.missing_status)
                    return
                size = os.path.getsize(path)
                start, end = 0, size
                match = _RANGE.match(self.headers.get("Range", ""))
                if match and server.fail_ranged_reads:
                    self.send_error(500)
                    return
                if match and not server.ignore_ranges:
                    start = int(match.group(1))
                    end = min(size, int(match.group(2)) + 1 if match.group(2) else size)
                    if server.range_cap is not None:   # a valid partial answer
                        end = min(end, start + server.range_cap)
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{end - 1}/{size}")
                else:
                    self.send_response(200)
                self.send_header("Accept-Ranges", "bytes")
                self.send_header("Content-Length", str(max(0, end - start)))
                self.end_headers()
                if not body:
                    return
                with open(path, "rb") as f:
                    f.seek(start)
                    data = f.read(max(0, end - start))
                # Counted before the write: a client that has its bytes may
                # read the count before this thread runs on after the write.
                with server._lock:
                    server.bytes_served += len(data)
                    server.ranges.append((start, end))
                self.wfile.write(data)

        class Server(http.server.ThreadingHTTPServer):
            def handle_error(self, request, client_address):
                # A client closing early (e.g. fsspec reading only the start of
                # a whole-file answer) is not a server error worth a traceback.
                if not isinstance(sys.exc_info()[1], ConnectionError):
                    super().handle_error(request, client_address)

        self._httpd = Server(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def url(self, name: str) -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}/{name}"

    def reset(self) -> None:
        with self._lock:
            self.bytes_served = 0
            self.max_in_flight = 0
            self.ranges = []

    def __enter__(self) -> "RangeServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
