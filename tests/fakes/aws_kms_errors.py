"""A scripted fake of AWS KMS error answers (moto does not refuse disabled keys).

Usage: aws_kms_errors.py PORT MODE COUNTFILE
MODE: "disabled" answers every call with DisabledException (HTTP 400);
      "throttle" answers every call with ThrottlingException (HTTP 400);
      "unavailable" answers every call with HTTP 503.
Every request received is counted in COUNTFILE (one line per request).
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port, mode, count_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]

ANSWERS = {
    "disabled": (400, {"__type": "DisabledException",
                       "message": "arn:aws:kms:us-east-1:123456789012:key/11111111-2222-3333-4444-555555555555 is disabled."}),
    "throttle": (400, {"__type": "ThrottlingException", "message": "Rate exceeded"}),
    "unavailable": (503, {"__type": "KMSInternalException", "message": "service unavailable"}),
}


class Handler(BaseHTTPRequestHandler):
    def do_POST(self):
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with open(count_file, "a") as f:
            f.write(self.headers.get("X-Amz-Target", "") + "\n")
        status, body = ANSWERS[mode]
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/x-amz-json-1.1")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
