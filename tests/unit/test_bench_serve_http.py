"""bench/serve.py's http part against a small stdlib HTTP server: requests, errors and percentiles are counted."""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from bench.serve import LoadResult, format_http_row, http_variants, measure_http


class _Recommend(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as jobs.serve's proxy

    def do_POST(self):  # noqa: N802 -- the stdlib's name
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        status = 422 if body.get("k") == 0 else 200
        payload = json.dumps({"items": []} if status == 200 else {"error": "'k' must be"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):  # quiet
        pass


def test_measure_http_counts_answers_errors_and_orders_percentiles():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recommend)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        good = measure_http(base, [b'{"history": ["1"], "k": 10}'], concurrency=4, seconds=0.5, variant="exact",
                            warmup_s=0.1)
        assert good.requests > 10 and good.errors == 0 and good.concurrency == 4
        assert 0 < good.p50_ms <= good.p90_ms <= good.p99_ms <= good.max_ms
        assert abs(good.throughput_rps - good.requests / good.seconds) <= 0.02 * good.throughput_rps  # rounding
        bad = measure_http(base, [b'{"history": ["1"], "k": 0}'], concurrency=2, seconds=0.3, warmup_s=0)
        assert bad.requests == 0 and bad.errors > 0
        assert isinstance(good, LoadResult) and format_http_row(good).split()[:2] == ["exact", "4"]
    finally:
        server.shutdown()


def test_http_variants_funnel_at_every_size_below_the_full_one():
    assert [label for label, _ in http_variants([32, 64, 128])] == ["exact", "funnel@32", "funnel@64"]
    assert http_variants([128, 32])[1] == ("funnel@32", {"mode": "funnel", "size": 32})
    assert http_variants([128]) == [("exact", {"mode": "exact"})]  # no Matryoshka sizes: exact only
