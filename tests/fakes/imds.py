"""A fake EC2 instance metadata service (IMDSv2 only) on loopback.

Usage: imds.py PORT ACCESS_KEY SECRET_KEY
Requires the session token from PUT /latest/api/token on every GET, as IMDSv2 does.
"""
import json
import sys
from http.server import BaseHTTPRequestHandler, HTTPServer

port, access_key, secret_key = int(sys.argv[1]), sys.argv[2], sys.argv[3]
TOKEN = "fake-imds-session-token"
ROLE = "kmsfs-test-role"


class Handler(BaseHTTPRequestHandler):
    def reply(self, status, body):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_PUT(self):
        if self.path == "/latest/api/token" and self.headers.get("X-aws-ec2-metadata-token-ttl-seconds"):
            self.reply(200, TOKEN)
        else:
            self.reply(400, "bad token request")

    def do_GET(self):
        if self.headers.get("X-aws-ec2-metadata-token") != TOKEN:
            self.reply(401, "IMDSv2 token required")
        elif self.path == "/latest/meta-data/iam/security-credentials/":
            self.reply(200, ROLE)
        elif self.path == f"/latest/meta-data/iam/security-credentials/{ROLE}":
            self.reply(200, json.dumps({"Code": "Success", "AccessKeyId": access_key, "SecretAccessKey": secret_key,
                                        "Token": "session-token", "Expiration": "2099-01-01T00:00:00Z"}))
        elif self.path == "/latest/meta-data/placement/region":
            self.reply(200, "us-east-1")
        else:
            self.reply(404, "not found")

    def log_message(self, *args):
        pass


HTTPServer(("127.0.0.1", port), Handler).serve_forever()
