"""gRPC through Switchyard with a real gRPC implementation (grpcio) at both ends.

Two gRPC servers (the backends) stand behind one pool with `upstream_protocol = "h2"`; a gRPC
client reaches them through an h2c listener (prior knowledge, as gRPC speaks it without TLS) and
through a TLS listener (HTTP/2 chosen by ALPN). Each of the four call shapes is made on both, and
what gRPC carries outside the messages is checked on the way back: status codes and details in
trailers, custom and binary metadata, deadlines, cancellation reaching the backend, messages of
several MiB, and round robin across the two backends.

Usage: grpc-interop.py SWITCHYARD_BINARY CA_PEM CERT_PEM KEY_PEM
Exits 0 when every check holds; otherwise prints what failed and exits 1.
"""

import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from concurrent import futures

import grpc

SERVICE = "interop.Echo"
# Every wait below is bounded by this.
PATIENCE = 20.0


class Backend:
    """One gRPC server whose handlers take and give raw bytes (no protobuf needed)."""

    def __init__(self, name):
        self.name = name
        self.cancelled = threading.Event()
        self.server = grpc.server(futures.ThreadPoolExecutor(max_workers=16))
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self.unary),
            "ServerStream": grpc.unary_stream_rpc_method_handler(self.server_stream),
            "ClientStream": grpc.stream_unary_rpc_method_handler(self.client_stream),
            "Bidi": grpc.stream_stream_rpc_method_handler(self.bidi),
            "Fail": grpc.unary_unary_rpc_method_handler(self.fail),
            "Slow": grpc.unary_unary_rpc_method_handler(self.slow),
        }
        # The standard health service, answered by hand (HealthCheckRequest and
        # HealthCheckResponse are one field each): the proxy's gRPC health checks call it.
        self.serving = True
        self.health_asked = set()
        health = {"Check": grpc.unary_unary_rpc_method_handler(self.check)}
        self.server.add_generic_rpc_handlers(
            (
                grpc.method_handlers_generic_handler(SERVICE, handlers),
                grpc.method_handlers_generic_handler("grpc.health.v1.Health", health),
            )
        )
        self.port = self.server.add_insecure_port("127.0.0.1:0")
        self.server.start()

    def check(self, request, context):
        # Field 1 (tag 0x0a), a one-byte length, the service name.
        service = request[2:].decode() if request[:1] == b"\x0a" else ""
        self.health_asked.add(service)
        if service != SERVICE:
            context.abort(grpc.StatusCode.NOT_FOUND, "unknown service")
        return b"\x08\x01" if self.serving else b"\x08\x02"

    def trailers(self, context):
        context.set_trailing_metadata(
            (("x-backend", self.name), ("x-checksum-bin", b"\x00\xff\x10"))
        )

    def unary(self, request, context):
        # Echo the client's metadata back in the initial metadata, so the test sees that both
        # directions carry it.
        got = dict(context.invocation_metadata())
        context.send_initial_metadata((("x-echo", got.get("x-client", "")),))
        self.trailers(context)
        return request

    def server_stream(self, request, context):
        count = int(request.decode())
        for i in range(count):
            yield b"%d" % i
        self.trailers(context)

    def client_stream(self, requests, context):
        total = 0
        for message in requests:
            total += len(message)
        self.trailers(context)
        return b"%d" % total

    def bidi(self, requests, context):
        for message in requests:
            yield message[::-1]
        self.trailers(context)

    def fail(self, request, context):
        context.abort(grpc.StatusCode.PERMISSION_DENIED, "no entry for " + request.decode())

    def slow(self, request, context):
        # Waits for the client to give up; the proxy must pass the cancellation on.
        deadline = time.monotonic() + PATIENCE
        while context.is_active() and time.monotonic() < deadline:
            time.sleep(0.01)
        if not context.is_active():
            self.cancelled.set()
        return request


def start_proxy(binary, config_text, workdir):
    """Starts Switchyard and returns (process, {listener name: port}) once it listens."""
    config = os.path.join(workdir, "grpc.toml")
    with open(config, "w") as f:
        f.write(config_text)
    log = open(os.path.join(workdir, "switchyard.log"), "w+")
    process = subprocess.Popen(
        [binary, "run", "--threads", "2", "--config", config], stdout=log, stderr=log
    )
    ports = {}
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and len(ports) < 2:
        if process.poll() is not None:
            break
        log.seek(0)
        for name, port in re.findall(r"listener=(\S+) addr=127\.0\.0\.1:(\d+)", log.read()):
            ports[name] = int(port)
        time.sleep(0.05)
    if len(ports) < 2:
        log.seek(0)
        sys.exit("Switchyard did not start its listeners:\n" + log.read())
    return process, ports


class Checks:
    def __init__(self):
        self.failures = []

    def that(self, condition, what):
        print(("ok    " if condition else "FAIL  ") + what, flush=True)
        if not condition:
            self.failures.append(what)


def exercise(channel, label, backends, check):
    unary = channel.unary_unary(f"/{SERVICE}/Unary")
    server_stream = channel.unary_stream(f"/{SERVICE}/ServerStream")
    client_stream = channel.stream_unary(f"/{SERVICE}/ClientStream")
    bidi = channel.stream_stream(f"/{SERVICE}/Bidi")
    fail = channel.unary_unary(f"/{SERVICE}/Fail")
    slow = channel.unary_unary(f"/{SERVICE}/Slow")

    reply, call = unary.with_call(
        b"hello", metadata=(("x-client", "c-1"),), timeout=PATIENCE
    )
    trailing = dict(call.trailing_metadata())
    check.that(reply == b"hello", f"{label}: unary echo")
    check.that(
        dict(call.initial_metadata()).get("x-echo") == "c-1",
        f"{label}: client metadata reaches the backend, initial metadata comes back",
    )
    check.that(
        trailing.get("x-checksum-bin") == b"\x00\xff\x10",
        f"{label}: binary trailing metadata intact",
    )
    check.that(call.code() == grpc.StatusCode.OK, f"{label}: status OK from the trailers")

    seen = set()
    for _ in range(4):
        _, call = unary.with_call(b"x", timeout=PATIENCE)
        seen.add(dict(call.trailing_metadata()).get("x-backend"))
    check.that(seen == set(backends), f"{label}: calls spread over both backends ({seen})")

    messages = list(server_stream(b"1000", timeout=PATIENCE))
    check.that(
        messages == [b"%d" % i for i in range(1000)],
        f"{label}: server streaming, 1000 messages in order",
    )

    chunks = [os.urandom(64 * 1024) for _ in range(48)]
    total = client_stream(iter(chunks), timeout=PATIENCE)
    check.that(total == b"%d" % (48 * 64 * 1024), f"{label}: client streaming, 3 MiB in 48 messages")

    words = [b"alpha", b"beta", b"gamma", b"delta"] * 50
    back = list(bidi(iter(words), timeout=PATIENCE))
    check.that(back == [w[::-1] for w in words], f"{label}: bidirectional streaming, 200 messages")

    big = os.urandom(3 * 1024 * 1024)
    check.that(unary(big, timeout=PATIENCE) == big, f"{label}: one 3 MiB message each way")

    try:
        fail(b"eve", timeout=PATIENCE)
        check.that(False, f"{label}: error status")
    except grpc.RpcError as error:
        check.that(
            error.code() == grpc.StatusCode.PERMISSION_DENIED and error.details() == "no entry for eve",
            f"{label}: error status and message from the trailers ({error.code()}, {error.details()!r})",
        )

    for backend in backends.values():
        backend.cancelled.clear()
    started = time.monotonic()
    try:
        slow(b"wait", timeout=0.5)
        check.that(False, f"{label}: deadline")
    except grpc.RpcError as error:
        check.that(
            error.code() == grpc.StatusCode.DEADLINE_EXCEEDED and time.monotonic() - started < 5,
            f"{label}: deadline exceeded on time ({error.code()})",
        )
    deadline = time.monotonic() + PATIENCE
    while time.monotonic() < deadline and not any(b.cancelled.is_set() for b in backends.values()):
        time.sleep(0.01)
    check.that(
        any(b.cancelled.is_set() for b in backends.values()),
        f"{label}: the cancelled call is cancelled at the backend too",
    )

    # Many calls at once on one connection: multiplexed, none lost.
    with futures.ThreadPoolExecutor(max_workers=32) as pool:
        results = list(pool.map(lambda i: unary(b"%d" % i, timeout=PATIENCE), range(500)))
    check.that(results == [b"%d" % i for i in range(500)], f"{label}: 500 concurrent unary calls")


def main():
    binary, ca, cert, key = sys.argv[1:5]
    backends = {name: Backend(name) for name in ("grpc-1", "grpc-2")}
    config = f"""
[[listeners]]
name = "grpc-h2c"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "grpc"

[[listeners]]
name = "grpc-tls"
bind = "127.0.0.1:0"
protocol = "http"
default_pool = "grpc"
tls = {{ certificates = [{{ cert = "{cert}", key = "{key}" }}] }}

[pools.grpc]
upstream_protocol = "h2"
backends = [{", ".join(f'"127.0.0.1:{b.port}"' for b in backends.values())}]
health = {{ kind = "grpc", service = "{SERVICE}", interval = "200ms", timeout = "200ms", rise = 1, fall = 1 }}
"""
    check = Checks()
    with tempfile.TemporaryDirectory() as workdir:
        process, ports = start_proxy(binary, config, workdir)
        try:
            with grpc.insecure_channel(f"127.0.0.1:{ports['grpc-h2c']}") as channel:
                exercise(channel, "h2c", backends, check)
            with open(ca, "rb") as f:
                credentials = grpc.ssl_channel_credentials(root_certificates=f.read())
            with grpc.secure_channel(
                f"localhost:{ports['grpc-tls']}", credentials
            ) as channel:
                exercise(channel, "tls", backends, check)
            # Health: a backend that says NOT_SERVING is taken out of the pool, and back in
            # once it serves again.
            check.that(
                all(b.health_asked == {SERVICE} for b in backends.values()),
                "the proxy's gRPC health checks ask about the configured service",
            )
            with grpc.insecure_channel(f"127.0.0.1:{ports['grpc-h2c']}") as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary")

                def backends_seen(calls):
                    return [
                        dict(unary.with_call(b"x", timeout=PATIENCE)[1].trailing_metadata()).get(
                            "x-backend"
                        )
                        for _ in range(calls)
                    ]

                def settles(wanted):
                    deadline = time.monotonic() + PATIENCE
                    while time.monotonic() < deadline:
                        if set(backends_seen(6)) == wanted:
                            return True
                        time.sleep(0.05)
                    return False

                backends["grpc-2"].serving = False
                check.that(settles({"grpc-1"}), "NOT_SERVING takes a backend out of the pool")
                backends["grpc-2"].serving = True
                check.that(settles({"grpc-1", "grpc-2"}), "SERVING again brings it back")
            # A backend goes away: its calls move to the other one; with none left, the
            # client learns it from the status, as from any gRPC server.
            backends["grpc-2"].server.stop(None).wait(PATIENCE)
            with grpc.insecure_channel(f"127.0.0.1:{ports['grpc-h2c']}") as channel:
                unary = channel.unary_unary(f"/{SERVICE}/Unary")
                seen = []
                for _ in range(10):
                    _, call = unary.with_call(b"x", timeout=PATIENCE)
                    seen.append(dict(call.trailing_metadata()).get("x-backend"))
                check.that(seen == ["grpc-1"] * 10, f"backend stopped: every call on the other ({seen})")
                backends["grpc-1"].server.stop(None).wait(PATIENCE)
                try:
                    unary(b"x", timeout=PATIENCE)
                    check.that(False, "no backend: UNAVAILABLE")
                except grpc.RpcError as error:
                    check.that(
                        error.code() == grpc.StatusCode.UNAVAILABLE
                        and error.details() in ("502 Bad Gateway", "503 Service Unavailable"),
                        f"no backend: UNAVAILABLE ({error.code()}, {error.details()!r})",
                    )
            check.that(process.poll() is None, "Switchyard still running")
        finally:
            process.terminate()
            try:
                process.wait(timeout=PATIENCE)
            except subprocess.TimeoutExpired:
                process.kill()
            check.that(process.returncode == 0, f"Switchyard exits 0 on SIGTERM ({process.returncode})")
            if check.failures:
                with open(os.path.join(workdir, "switchyard.log")) as f:
                    print("--- Switchyard's log ---\n" + f.read()[-20000:])
    for backend in backends.values():
        backend.server.stop(None)
    if check.failures:
        print(f"{len(check.failures)} check(s) failed")
        sys.exit(1)
    print("all gRPC interop checks passed")


if __name__ == "__main__":
    main()
