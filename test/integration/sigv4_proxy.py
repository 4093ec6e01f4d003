#!/usr/bin/python3
"""An HTTP proxy that verifies every request's AWS SigV4 signature (header auth, service s3)
the way S3 does, before passing it on byte for byte to an S3 server that does not (s3rver).

The verifier is independent of the client under test (libcurl's CURLOPT_AWS_SIGV4): it
rebuilds the canonical request from what arrived, the way the server side has to (the path
and the query decoded, then re-encoded by SigV4's rules), and lets botocore's own signer
(botocore.auth.S3SigV4Auth: canonical request, string to sign, signing key, signature) compute
the signature the secret gives. Also checked: the credential scope (known key, date equal to
x-amz-date's, region, service "s3", "aws4_request"), x-amz-date within 15 minutes, every x-amz-*
header and host signed, x-amz-content-sha256 present and equal to the body's SHA-256 (unless
UNSIGNED-PAYLOAD). A refusal is a 403 (400 for a bad payload hash) with S3's XML error body
(SignatureDoesNotMatch, InvalidAccessKeyId, RequestTimeTooSkewed, AuthorizationHeaderMalformed,
XAmzContentSHA256Mismatch, ...). One line per request goes to the log file:
    OK <METHOD> <raw target> key=<KEYID> signed=<SignedHeaders> [noncanonical-target]
(noncanonical-target: the path or query was not sent in SigV4's canonical encoding and order;
the signature matched the canonical form, which a server that signs the raw target would not.)
    DENY <Code> <METHOD> <raw target> <detail>

Usage:
  sigv4_proxy.py --listen PORT --upstream http://127.0.0.1:PORT --log FILE \
      --credential KEYID:SECRET [--credential ...] [--region R]   (or $SIGV4_PROXY_CREDENTIALS,
                                                                   "KEYID:SECRET,KEYID:SECRET")
  sigv4_proxy.py --self-test     the verifier refuses what it must (exit 0 when it does)
Needs /usr/bin/python3 with python3-botocore (Debian).
"""

import argparse
import datetime
import hashlib
import http.client
import http.server
import os
import socketserver
import sys
import threading
import urllib.parse
from xml.sax.saxutils import escape

from botocore.auth import S3SigV4Auth, UNSIGNED_PAYLOAD
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

MAX_SKEW = datetime.timedelta(minutes=15)
HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "te", "trailer", "upgrade", "expect"}


class Refused(Exception):
    def __init__(self, code, detail, http_status=403):
        super().__init__(f"{code}: {detail}")
        self.code, self.detail, self.http_status = code, detail, http_status


def parse_authorization(value):
    """'AWS4-HMAC-SHA256 Credential=K/D/R/S/aws4_request, SignedHeaders=a;b, Signature=hex'."""
    algo, _, rest = value.strip().partition(" ")
    if algo != "AWS4-HMAC-SHA256":
        raise Refused("AuthorizationHeaderMalformed", f"algorithm {algo!r}", 400)
    fields = {}
    for part in rest.split(","):
        k, sep, v = part.strip().partition("=")
        if not sep or k in fields:
            raise Refused("AuthorizationHeaderMalformed", f"field {part.strip()!r}", 400)
        fields[k] = v
    if set(fields) != {"Credential", "SignedHeaders", "Signature"}:
        raise Refused("AuthorizationHeaderMalformed", f"fields {sorted(fields)}", 400)
    scope = fields["Credential"].split("/")
    if len(scope) != 5:
        raise Refused("AuthorizationHeaderMalformed", f"credential {fields['Credential']!r}", 400)
    signed = fields["SignedHeaders"].split(";")
    if signed != sorted(signed) or any(h != h.lower() or not h for h in signed):
        raise Refused("AuthorizationHeaderMalformed", f"SignedHeaders {fields['SignedHeaders']!r}", 400)
    return scope, signed, fields["Signature"]


def server_query_params(query):
    """The query parameters as the server understands them: split on '&', each name and value
    percent-decoded ('+' is a space, as S3 reads it). SigV4 signs their canonical re-encoding."""
    params = []
    if not query:
        return params
    for pair in query.split("&"):
        k, _, v = pair.partition("=")
        params.append((urllib.parse.unquote_plus(k), urllib.parse.unquote_plus(v)))
    return params


def verify(method, target, headers, body, credentials, region, now=None):
    """Checks one request; returns (access key id, signed header names, whether the target was
    sent in canonical form), raises Refused.

    target: the request-target exactly as sent (path?query); headers: list of (name, value) as
    received; body: bytes; credentials: {key id: secret}."""
    hdr = {}
    for name, value in headers:
        hdr.setdefault(name.lower(), []).append(value)
    auth = hdr.get("authorization")
    if not auth:
        raise Refused("AccessDenied", "no Authorization header")
    scope, signed, signature = parse_authorization(auth[0])
    key_id, date, scope_region, service, terminator = scope
    if key_id not in credentials:
        raise Refused("InvalidAccessKeyId", f"unknown access key id {key_id!r}")
    if terminator != "aws4_request" or service != "s3":
        raise Refused("AuthorizationHeaderMalformed", f"scope service {service!r}/{terminator!r}", 400)
    if scope_region != region:
        raise Refused("AuthorizationHeaderMalformed",
                      f"scope region {scope_region!r}, this endpoint is {region!r}", 400)
    amz_date = (hdr.get("x-amz-date") or [""])[0]
    try:
        when = datetime.datetime.strptime(amz_date, "%Y%m%dT%H%M%SZ")
    except ValueError:
        raise Refused("AccessDenied", f"x-amz-date {amz_date!r} missing or malformed")
    now = now or datetime.datetime.utcnow()
    if abs(now - when) > MAX_SKEW:
        raise Refused("RequestTimeTooSkewed", f"x-amz-date {amz_date} vs now {now:%Y%m%dT%H%M%SZ}")
    if date != amz_date[:8]:
        raise Refused("SignatureDoesNotMatch", f"scope date {date} is not x-amz-date's {amz_date[:8]}")
    payload = (hdr.get("x-amz-content-sha256") or [None])[0]
    if payload is None:
        raise Refused("InvalidRequest", "missing x-amz-content-sha256", 400)
    # What S3 insists on: host and every x-amz-* header that was sent are signed.
    for must in ["host"] + sorted(h for h in hdr if h.startswith("x-amz-")):
        if must not in signed:
            raise Refused("AccessDenied", f"header {must} was sent but not signed")
    for h in signed:
        if h not in hdr:
            raise Refused("AccessDenied", f"signed header {h} was not sent")
    if payload != UNSIGNED_PAYLOAD and payload != hashlib.sha256(body).hexdigest():
        raise Refused("XAmzContentSHA256Mismatch",
                      f"x-amz-content-sha256 {payload} is not the body's {hashlib.sha256(body).hexdigest()}", 400)

    # The canonical request, rebuilt the way the server sees the request: the path decoded and
    # re-encoded once (S3 does not normalise or double-encode it), the query decoded and handed
    # to botocore as parameters (it encodes and sorts them), only the signed headers' values.
    raw_path, _, raw_query = target.partition("?")
    canonical_path = urllib.parse.quote(urllib.parse.unquote(raw_path), safe="/~")
    host = hdr["host"][0] if "host" in hdr else "localhost"
    req = AWSRequest(method=method, url=f"http://{host}{canonical_path}",
                     params=server_query_params(raw_query))
    for h in signed:
        for v in hdr[h]:
            req.headers[h] = v  # HTTPHeaders keeps repeats; botocore joins them with ','
    req.context["timestamp"] = amz_date
    signer = S3SigV4Auth(Credentials(key_id, credentials[key_id]), "s3", region)
    headers_to_sign = signer.headers_to_sign(req)
    if signer.signed_headers(headers_to_sign) != ";".join(signed):
        raise Refused("SignatureDoesNotMatch",
                      f"SignedHeaders {';'.join(signed)} != {signer.signed_headers(headers_to_sign)}")
    canonical = signer.canonical_request(req)
    # Sent exactly in canonical form (path and query), the request means the same to a server
    # that signs the raw target and to one that re-encodes what it decoded.
    as_sent = raw_path == canonical_path and raw_query == signer.canonical_query_string(req)
    expected = signer.signature(signer.string_to_sign(req, canonical), req)
    if expected != signature:
        raise Refused("SignatureDoesNotMatch",
                      "canonical request " + repr(canonical) + f" gives {expected}, got {signature}")
    return key_id, signed, as_sent


class Proxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True
    allow_reuse_address = True


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "sigv4-proxy"

    def log_message(self, fmt, *args):  # the verdict log is ours; keep stderr quiet
        pass

    def verdict(self, line):
        with self.server.log_lock:
            self.server.log.write(line + "\n")
            self.server.log.flush()

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            out = bytearray()
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return bytes(out)
                out += self.rfile.read(size)
                self.rfile.readline()
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def refuse(self, r):
        xml = ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>' + escape(r.code) +
               "</Code><Message>" + escape(r.detail) + "</Message><Resource>" +
               escape(self.path) + "</Resource></Error>").encode()
        self.send_response(r.http_status)
        self.send_header("Content-Type", "application/xml")
        self.send_header("Content-Length", str(len(xml)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(xml)

    def handle_any(self):
        body = self.read_body()
        try:
            key_id, signed, as_sent = verify(self.command, self.path, self.headers.items(), body,
                                    self.server.credentials, self.server.region)
        except Refused as r:
            self.verdict(f"DENY {r.code} {self.command} {self.path} {r.detail!r}")
            self.refuse(r)
            return
        except Exception as e:  # a verifier bug must not look like a pass
            self.verdict(f"DENY InternalError {self.command} {self.path} {e!r}")
            self.refuse(Refused("InternalError", repr(e), 500))
            return
        self.verdict(f"OK {self.command} {self.path} key={key_id} signed={';'.join(signed)}"
                     + ("" if as_sent else " noncanonical-target"))
        up = http.client.HTTPConnection(self.server.upstream_host, self.server.upstream_port,
                                         timeout=120)
        try:
            up.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():
                if name.lower() not in HOP_BY_HOP and name.lower() != "transfer-encoding":
                    up.putheader(name, value)
            if "content-length" not in {k.lower() for k in self.headers.keys()} and body:
                up.putheader("Content-Length", str(len(body)))
            up.endheaders(body if body else None)
            resp = up.getresponse()
            self.send_response_only(resp.status, resp.reason)
            length = resp.getheader("Content-Length")
            for name, value in resp.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "transfer-encoding":
                    self.send_header(name, value)
            if length is None and self.command != "HEAD" and resp.status not in (204, 304):
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            if self.command != "HEAD":
                while True:
                    piece = resp.read(65536)
                    if not piece:
                        break
                    self.wfile.write(piece)
        finally:
            up.close()

    do_GET = do_PUT = do_HEAD = do_DELETE = do_POST = handle_any


def parse_credentials(items):
    out = {}
    for item in items:
        for one in item.split(","):
            if one:
                k, sep, s = one.partition(":")
                if not sep:
                    sys.exit(f"credential {one!r}: expected KEYID:SECRET")
                out[k] = s
    return out


# ---- self-test: the verifier must refuse, or it proves nothing ----

def _signed(method, url, body=b"", key="AKIDEXAMPLE", secret="secret/key+1", region="eu-west-3",
            service="s3", token=None, extra=None):
    """A request signed by botocore the way a correct S3 client signs it: (target, headers)."""
    parts = urllib.parse.urlsplit(url)
    params = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    path = urllib.parse.quote(parts.path, safe="/~")  # as botocore's S3 serializer does
    req = AWSRequest(method=method, url=f"{parts.scheme}://{parts.netloc}{path}",
                     data=body, params=params)
    req.headers["Host"] = parts.netloc
    for k, v in (extra or {}).items():
        req.headers[k] = v
    S3SigV4Auth(Credentials(key, secret, token), service, region).add_auth(req)
    query = "&".join(f"{urllib.parse.quote(k, safe='-_.~')}={urllib.parse.quote(v, safe='-_.~')}"
                     for k, v in sorted(params))
    target = path + ("?" + query if query else "")
    return target, list(req.headers.items())


def self_test():
    creds = {"AKIDEXAMPLE": "secret/key+1", "OTHER": "x"}
    region = "eu-west-3"
    failures = []

    def expect(name, want, method, target, headers, body=b"", now=None):
        try:
            got = "OK" if verify(method, target, headers, body, creds, region, now)[2] else "OK-noncanonical"
        except Refused as r:
            got = r.code
        ok = got == want
        print(f"{'pass' if ok else 'FAIL'}: {name}: {got}" + ("" if ok else f" (want {want})"))
        if not ok:
            failures.append(name)

    def with_header(headers, name, value):
        return [(k, value if k.lower() == name else v) for k, v in headers]

    token = "Zm9v+YmFy/YmF6=="  # a continuation token's alphabet
    url = f"http://127.0.0.1:9000/bkt?list-type=2&prefix=a/b c&continuation-token={urllib.parse.quote(token)}"
    t, h = _signed("GET", url)
    expect("botocore-signed listing with '+/= ' in the query", "OK", "GET", t, h)
    # The same parameters in another order and with other (equivalent) percent-encodings.
    t2 = "/bkt?prefix=a%2fb%20c&list-type=2&continuation-token=" + urllib.parse.quote(token, safe="")
    expect("same query reordered, lower-case hex", "OK-noncanonical", "GET", t2, h)
    expect("a query parameter changed", "SignatureDoesNotMatch", "GET", t.replace("prefix=a", "prefix=z"), h)
    expect("a query parameter added", "SignatureDoesNotMatch", "GET", t + "&max-keys=5", h)
    expect("a '+' sent raw in the token (a space to the server)", "SignatureDoesNotMatch", "GET",
           t.replace("%2B", "+"), h)
    body = os.urandom(3000)
    t, h = _signed("PUT", "http://127.0.0.1:9000/bkt/p/chunks/ab/k ey+=~!", body,
                   extra={"Content-Type": "application/octet-stream"})
    expect("botocore-signed PUT, key with characters to encode", "OK", "PUT", t, h, body)
    bad = dict(creds, AKIDEXAMPLE="not the secret")
    try:
        verify("PUT", t, h, body, bad, region)
        print("FAIL: wrong secret: OK")
        failures.append("wrong secret")
    except Refused as r:
        print(f"{'pass' if r.code == 'SignatureDoesNotMatch' else 'FAIL'}: wrong secret: {r.code}")
        if r.code != "SignatureDoesNotMatch":
            failures.append("wrong secret")
    changed = bytearray(body)
    changed[100] ^= 1
    expect("body changed", "XAmzContentSHA256Mismatch", "PUT", t, h, bytes(changed))
    sha = hashlib.sha256(bytes(changed)).hexdigest()
    expect("body and its hash changed", "SignatureDoesNotMatch", "PUT", t,
           with_header(h, "x-amz-content-sha256", sha), bytes(changed))
    expect("a signed header changed", "SignatureDoesNotMatch", "PUT", t,
           with_header(h, "content-type", "text/plain"), body)
    expect("the path changed", "SignatureDoesNotMatch", "PUT", t.replace("/ab/", "/ac/"), h, body)
    expect("method changed", "SignatureDoesNotMatch", "POST", t, h, body)
    expect("an unsigned x-amz-* header", "AccessDenied", "PUT", t, h + [("x-amz-meta-x", "1")], body)
    expect("no payload hash", "InvalidRequest", "PUT", t,
           [(k, v) for k, v in h if k.lower() != "x-amz-content-sha256"], body)
    t, h = _signed("GET", "http://127.0.0.1:9000/bkt/k", key="NOBODY")
    expect("unknown access key", "InvalidAccessKeyId", "GET", t, h)
    t, h = _signed("GET", "http://127.0.0.1:9000/bkt/k", region="us-east-1")
    expect("another region", "AuthorizationHeaderMalformed", "GET", t, h)
    t, h = _signed("GET", "http://127.0.0.1:9000/bkt/k", service="ec2")
    expect("another service", "AuthorizationHeaderMalformed", "GET", t, h)
    t, h = _signed("GET", "http://127.0.0.1:9000/bkt/k")
    expect("the same path with a letter percent-encoded", "OK-noncanonical", "GET", "/bkt/%6B", h)
    later = datetime.datetime.utcnow() + datetime.timedelta(minutes=16)
    expect("x-amz-date 16 minutes old", "RequestTimeTooSkewed", "GET", t, h, now=later)
    expect("x-amz-date 14 minutes old", "OK", "GET", t, h,
           now=datetime.datetime.utcnow() + datetime.timedelta(minutes=14))
    t, h = _signed("GET", "http://127.0.0.1:9000/bkt/k", token="session/token+=")
    expect("session token signed", "OK", "GET", t, h)
    expect("session token changed", "SignatureDoesNotMatch", "GET", t,
           with_header(h, "x-amz-security-token", "other"))
    # A client that signs a query value as sent, with a raw '/', where S3 canonicalises %2F.
    req = AWSRequest(method="GET", url="http://127.0.0.1:9000/bkt?list-type=2&prefix=a/b")
    req.headers["Host"] = "127.0.0.1:9000"
    S3SigV4Auth(Credentials("AKIDEXAMPLE", creds["AKIDEXAMPLE"]), "s3", region).add_auth(req)
    expect("a raw '/' in a query value signed as sent", "SignatureDoesNotMatch", "GET",
           "/bkt?list-type=2&prefix=a/b", list(req.headers.items()))
    t, h = _signed("GET", "http://127.0.0.1:9000/bkt?list-type=2&prefix=a")
    auth = dict((k.lower(), v) for k, v in h)["authorization"]
    expect("signature field tampered", "SignatureDoesNotMatch", "GET", t,
           with_header(h, "authorization", auth[:-1] + ("0" if auth[-1] != "0" else "1")))
    if failures:
        print(f"self-test: {len(failures)} failure(s): {failures}")
        return 1
    print("self-test: the verifier refused every tampered request and accepted the good ones")
    return 0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--self-test", action="store_true")
    ap.add_argument("--listen", type=int)
    ap.add_argument("--upstream")
    ap.add_argument("--log")
    ap.add_argument("--region", default="us-east-1")
    ap.add_argument("--credential", action="append", default=[])
    a = ap.parse_args()
    if a.self_test:
        return self_test()
    creds = parse_credentials(a.credential + [os.environ.get("SIGV4_PROXY_CREDENTIALS", "")])
    if not (a.listen and a.upstream and a.log and creds):
        ap.error("--listen, --upstream, --log and a credential are required")
    up = urllib.parse.urlsplit(a.upstream)
    srv = Proxy(("127.0.0.1", a.listen), Handler)
    srv.upstream_host, srv.upstream_port = up.hostname, up.port or 80
    srv.credentials, srv.region = creds, a.region
    srv.log, srv.log_lock = open(a.log, "a", buffering=1), threading.Lock()
    srv.serve_forever()


if __name__ == "__main__":
    sys.exit(main())
