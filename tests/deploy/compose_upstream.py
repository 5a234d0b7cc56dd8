"""The allowed upstream of the compose test: HTTP on 80 and HTTPS on 443 (public.test, other.test),
answering JSON that names the host and path it was asked for."""

import json
import ssl
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Echo(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        body = json.dumps({"host": self.headers.get("Host"), "path": self.path}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def main() -> None:
    pki = sys.argv[1]
    plain = ThreadingHTTPServer(("0.0.0.0", 80), Echo)
    tls = ThreadingHTTPServer(("0.0.0.0", 443), Echo)
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(f"{pki}/upstream.crt", f"{pki}/upstream.key")
    tls.socket = ctx.wrap_socket(tls.socket, server_side=True)
    threading.Thread(target=plain.serve_forever, daemon=True).start()
    tls.serve_forever()


if __name__ == "__main__":
    main()
