#!/usr/bin/env python3
"""Drives the admin dashboard in headless Chromium against the compiled binary.

Checks: the page lists the pool's backends; a click on Drain makes the page show the backend
draining and /api/state say `draining: true`; Disable likewise; a weight typed into its field
reaches the API; names that are markup, quotes or URL syntax are shown as text, and the buttons
of a backend in a pool so named reach the API; with a token configured, the page asks for it, refuses a wrong one and works
with the right one; when the API goes away, the page shows its error banner.

Only the standard library: Chromium is spoken to over the DevTools protocol on a pipe
(--remote-debugging-pipe: JSON messages ended by NUL, commands on fd 3, answers on fd 4).

Usage: dashboard-test.py BINARY [--screenshots DIR]
"""

import base64
import fcntl
import http.server
import json
import os
import re
import shutil
import signal
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

STEP_TIMEOUT = 30.0  # seconds any one wait may take (Chromium starts slowly on a busy machine)
TOKEN = "dashboard-test-token-0123456789"


class Failure(Exception):
    pass


def deadline_loop(what, timeout=STEP_TIMEOUT, interval=0.1):
    """Yields until `timeout` passes, then fails naming `what`."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        yield
        time.sleep(interval)
    raise Failure(f"timed out after {timeout:.0f} s waiting for {what}")


# ---- backends: tiny HTTP servers on ports the kernel picks ----


class Backend(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # a client that resets is no news here


def start_backend(name):
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            body = name.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = Backend(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


# ---- the proxy under test ----


def toml_string(text):
    """`text` as a TOML basic string (a JSON string is one)."""
    return json.dumps(text)


class Proxy:
    def __init__(self, binary, work, name, backends, token=None, pool="app", extra=""):
        self.log_path = os.path.join(work, f"{name}.log")
        config = os.path.join(work, f"{name}.toml")
        admin = '[admin]\nbind = "127.0.0.1:0"\n'
        if token:
            admin += f'token = "{token}"\n'
        addresses = ", ".join(f'"127.0.0.1:{b.server_address[1]}"' for b in backends)
        with open(config, "w") as f:
            f.write(
                admin
                + '\n[[listeners]]\nname = "web"\nbind = "127.0.0.1:0"\nprotocol = "http"\n'
                + f"default_pool = {toml_string(pool)}\n\n  [[listeners.routes]]\n"
                + '  match = { path_prefix = "/static/" }\n'
                + f"  pool = {toml_string(pool)}\n\n[pools.{toml_string(pool)}]\n"
                + f"backends = [{addresses}]\n"
                + extra
            )
        self.log = open(self.log_path, "w")
        self.process = subprocess.Popen(
            [binary, "run", "--threads", "1", "--config", config],
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        self.token = token
        self.admin = self.web = None
        for _ in deadline_loop(f"{name} to start (log: {self.log_path})"):
            if self.process.poll() is not None:
                raise Failure(f"{name} exited with {self.process.returncode}:\n{self.read_log()}")
            text = self.read_log()
            admin = re.search(r"admin API listening addr=([0-9.:]+)", text)
            web = re.search(r"listening listener=web addr=([0-9.:]+)", text)
            if admin and web:
                self.admin, self.web = admin.group(1), web.group(1)
                break

    def read_log(self):
        with open(self.log_path) as f:
            return f.read()

    def state(self):
        request = urllib.request.Request(f"http://{self.admin}/api/state")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        with urllib.request.urlopen(request, timeout=5) as response:
            return json.load(response)

    def backend(self, address, pool=None):
        for found in self.state()["pools"]:
            if pool is not None and found["name"] != pool:
                continue
            for backend in found["backends"]:
                if backend["address"] == address:
                    return backend
        raise Failure(f"/api/state has no backend {address}")

    def traffic(self, requests):
        for _ in range(requests):
            with urllib.request.urlopen(f"http://{self.web}/", timeout=5) as response:
                response.read()

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


# ---- Chromium over the DevTools protocol ----


def find_chromium():
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    raise Failure("no chromium on PATH (apt-get install -y chromium)")


class Browser:
    def __init__(self, work):
        to_browser_r, to_browser_w = os.pipe()
        from_browser_r, from_browser_w = os.pipe()
        # Descriptors above 9 for the shell's redirections, so that moving them to 3 and 4
        # cannot overwrite one another.
        high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 20) for fd in (to_browser_r, from_browser_w)]
        for fd in (to_browser_r, from_browser_w):
            os.close(fd)
        args = [
            find_chromium(),
            "--headless",
            "--no-sandbox",  # CI runs as root
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-extensions",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--window-size=1400,1000",
            f"--user-data-dir={os.path.join(work, 'chromium-profile')}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.stderr = open(os.path.join(work, "chromium.log"), "w")
        self.process = subprocess.Popen(
            ["bash", "-c", f'exec "$0" "$@" 3<&{high[0]} 4>&{high[1]} {high[0]}<&- {high[1]}>&-']
            + args,
            pass_fds=high,
            stdin=subprocess.DEVNULL,
            stdout=self.stderr,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its helpers share its process group
        )
        for fd in high:
            os.close(fd)
        self.writer = os.fdopen(to_browser_w, "wb", buffering=0)
        self.reader_fd = from_browser_r
        self.next_id = 0
        self.lock = threading.Condition()
        self.replies = {}
        self.events = []
        self.closed = False
        threading.Thread(target=self._read, daemon=True).start()
        self.session = None
        try:
            target = self.call("Target.createTarget", {"url": "about:blank"})["targetId"]
            self.session = self.call(
                "Target.attachToTarget", {"targetId": target, "flatten": True}
            )["sessionId"]
            self.call("Page.enable")
            self.call("Runtime.enable")
        except Failure:
            self.close()
            raise

    def _read(self):
        buffer = b""
        while True:
            chunk = os.read(self.reader_fd, 65536)
            if not chunk:
                break
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                with self.lock:
                    if "id" in message:
                        self.replies[message["id"]] = message
                    else:
                        self.events.append(message)
                        del self.events[:-200]
                    self.lock.notify_all()
        with self.lock:
            self.closed = True
            self.lock.notify_all()

    def call(self, method, params=None, session=True):
        with self.lock:
            self.next_id += 1
            ident = self.next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session and self.session:
            message["sessionId"] = self.session
        self.writer.write(json.dumps(message).encode() + b"\0")
        end = time.monotonic() + STEP_TIMEOUT
        with self.lock:
            while ident not in self.replies:
                left = end - time.monotonic()
                if self.closed or left <= 0:
                    raise Failure(f"chromium gave no answer to {method}")
                self.lock.wait(left)
            reply = self.replies.pop(ident)
        if "error" in reply:
            raise Failure(f"{method}: {reply['error']}")
        return reply.get("result", {})

    def exceptions(self):
        with self.lock:
            return [
                e["params"]["exceptionDetails"]
                for e in self.events
                if e.get("method") == "Runtime.exceptionThrown"
            ]

    def eval(self, expression):
        result = self.call(
            "Runtime.evaluate",
            {"expression": expression, "returnByValue": True, "awaitPromise": True},
        )
        if "exceptionDetails" in result:
            raise Failure(f"page script failed: {expression}: {result['exceptionDetails']}")
        return result["result"].get("value")

    def navigate(self, url):
        self.call("Page.navigate", {"url": url})
        for _ in deadline_loop(f"{url} to load"):
            if self.eval("document.readyState") == "complete" and self.eval("location.href").startswith(url):
                return

    def wait_for(self, what, expression):
        for _ in deadline_loop(what):
            value = self.eval(expression)
            if value:
                return value

    def click(self, selector):
        """A real mouse click in the middle of the element `selector` matches."""
        box = self.eval(
            f"""(() => {{
              const e = document.querySelector({json.dumps(selector)});
              if (!e) return null;
              e.scrollIntoView({{block: "center"}});
              const r = e.getBoundingClientRect();
              return r.width && r.height ? {{x: r.x + r.width / 2, y: r.y + r.height / 2}} : null;
            }})()"""
        )
        if not box:
            raise Failure(f"nothing visible to click at {selector}")
        for kind in ("mousePressed", "mouseReleased"):
            self.call(
                "Input.dispatchMouseEvent",
                {"type": kind, "x": box["x"], "y": box["y"], "button": "left", "clickCount": 1},
            )

    def type_into(self, selector, text):
        self.click(selector)
        self.call("Input.insertText", {"text": text})

    def screenshot(self, path):
        data = self.call("Page.captureScreenshot", {"format": "png"})["data"]
        with open(path, "wb") as f:
            f.write(base64.b64decode(data))

    def close(self):
        try:
            self.call("Browser.close", session=False)
        except Failure:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.writer.close()
        self.stderr.close()


# ---- the checks ----


def row(address, inner=""):
    return f'[data-pool="app"] tr[data-backend="{address}"] {inner}'.strip()


def check_backends_listed(browser, addresses):
    browser.wait_for(
        "both backends in the page",
        "(() => { const rows = [...document.querySelectorAll('[data-pool=\"app\"] tr[data-backend]')];"
        f" const want = {json.dumps(addresses)};"
        " return want.every(a => rows.some(r => r.dataset.backend === a && r.offsetParent !== null)); })()",
    )
    browser.wait_for(
        "the listener in the page",
        "!!document.querySelector('tr[data-listener=\"web\"]')",
    )


def click_and_check(browser, proxy, address, action, state, field):
    selector = row(address, f'button[data-action="{action}"]')
    browser.wait_for(f"the {action} button of {address}", f"!!document.querySelector({json.dumps(selector)})")
    browser.click(selector)
    browser.wait_for(
        f"{address} to show as {state} in the page",
        f"(() => {{ const r = document.querySelector({json.dumps(row(address))});"
        f" return r && r.dataset.state === {json.dumps(state)}"
        f" && r.querySelector('.badge').textContent === {json.dumps(state)}; }})()",
    )
    backend = proxy.backend(address)
    if backend[field] is not True:
        raise Failure(f"after the click on {action}, /api/state says {field} = {backend[field]} for {address}")


# Names that break out of HTML, attributes, scripts and URL paths if anything renders them as
# markup or puts them in a path unescaped: each would set window.__xss.
ODD_POOL = 'a/b?c#d %41 <img src=x onerror="window.__xss=1"> \'q\' & "dq"'
ODD_LISTENER = "</script><script>window.__xss=2</script><svg onload=window.__xss=3>"


def check_odd_names(browser, proxy, address):
    """Names from the file are shown as text, and the buttons of a backend in a pool with an
    odd name reach the API (its path segments are encoded)."""
    find_pool = (
        "[...document.querySelectorAll('[data-pool]')]"
        f".find(e => e.dataset.pool === {json.dumps(ODD_POOL)})"
    )
    browser.wait_for(
        "the pool with an odd name, its name as text",
        f"(() => {{ const p = {find_pool}; return p && p.textContent.includes({json.dumps(ODD_POOL)}); }})()",
    )
    browser.wait_for(
        "the listener with an odd name, its name as text",
        "[...document.querySelectorAll('tr[data-listener]')]"
        f".some(r => r.dataset.listener === {json.dumps(ODD_LISTENER)}"
        f" && r.textContent.includes({json.dumps(ODD_LISTENER)}))",
    )
    injected = browser.eval(
        "(() => [window.__xss, document.querySelectorAll('img[src=\"x\"], svg[onload], script:not([data-page])').length])()"
    )
    # The page's own script is the one <script> element; nothing else may have been made.
    if injected[0] is not None or injected[1] > 1:
        raise Failure(f"a name was rendered as markup: window.__xss = {injected[0]}, elements = {injected[1]}")
    marked = browser.eval(
        f"""(() => {{ const p = {find_pool};
          const b = p && [...p.querySelectorAll('tr[data-backend]')].find(r => r.dataset.backend === {json.dumps(address)});
          const button = b && b.querySelector('button[data-action="drain"]');
          if (!button) return false;
          button.id = "odd-drain";
          return true; }})()"""
    )
    if not marked:
        raise Failure("no Drain button for the backend of the pool with an odd name")
    browser.click("#odd-drain")
    for _ in deadline_loop("the drain of the backend in the pool with an odd name to reach the API"):
        if proxy.backend(address, pool=ODD_POOL)["draining"]:
            break
    if proxy.backend(address, pool="app")["draining"]:
        raise Failure("the drain reached the same backend in another pool")


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        return 2
    binary = os.path.abspath(sys.argv[1])
    shots = None
    if len(sys.argv) == 4 and sys.argv[2] == "--screenshots":
        shots = sys.argv[3]
        os.makedirs(shots, exist_ok=True)
    started = time.monotonic()
    work = tempfile.mkdtemp(prefix="switchyard-dashboard-")
    backends = [start_backend("a"), start_backend("b")]
    addresses = [f"127.0.0.1:{b.server_address[1]}" for b in backends]
    proxies, browser = [], None
    try:
        # Without a token.
        proxy = Proxy(binary, work, "open", backends)
        proxies.append(proxy)
        proxy.traffic(20)
        browser = Browser(work)
        browser.navigate(f"http://{proxy.admin}/")
        check_backends_listed(browser, addresses)
        # Traffic between two polls shows as a rate.
        proxy.traffic(20)
        browser.wait_for(
            "a request rate in the page",
            f"(() => {{ const c = document.querySelector({json.dumps(row(addresses[0], 'td.rate'))});"
            " return c && c.textContent !== '–' && c.textContent !== '0'; })()",
        )
        if shots:
            browser.screenshot(os.path.join(shots, "1-up.png"))
        click_and_check(browser, proxy, addresses[0], "drain", "draining", "draining")
        if proxy.backend(addresses[1])["draining"]:
            raise Failure("the other backend is draining too")
        click_and_check(browser, proxy, addresses[1], "disable", "disabled", "disabled")
        # A new weight typed into the field and confirmed with Enter reaches the API.
        weight = row(addresses[1], "td input[type=number]")
        browser.click(weight)
        browser.eval(f"document.querySelector({json.dumps(weight)}).select()")
        browser.call("Input.insertText", {"text": "7"})
        for kind in ("keyDown", "keyUp"):
            browser.call(
                "Input.dispatchKeyEvent",
                {"type": kind, "key": "Enter", "code": "Enter", "windowsVirtualKeyCode": 13, "text": "\r"},
            )
        for _ in deadline_loop("the weight to reach the API"):
            if proxy.backend(addresses[1])["weight"] == 7:
                break
        browser.wait_for(
            "the page to show the weight set through the API",
            f"document.querySelector({json.dumps(row(addresses[1]))}).textContent.includes('set: weight')",
        )
        if shots:
            browser.screenshot(os.path.join(shots, "2-drained.png"))
            browser.call(
                "Emulation.setEmulatedMedia",
                {"features": [{"name": "prefers-color-scheme", "value": "dark"}]},
            )
            browser.screenshot(os.path.join(shots, "2-drained-dark.png"))
            browser.call("Emulation.setEmulatedMedia", {"features": []})
        print(f"dashboard: backends listed, drain, disable and weight work ({time.monotonic() - started:.1f} s)")

        # Names that would inject markup or break a URL path if not escaped.
        odd = (
            f"\n[[listeners]]\nname = {toml_string(ODD_LISTENER)}\nbind = \"127.0.0.1:0\"\n"
            + f"protocol = \"http\"\ndefault_pool = {toml_string(ODD_POOL)}\n\n"
            + f"[pools.{toml_string(ODD_POOL)}]\nbackends = [\"{addresses[0]}\"]\n"
        )
        proxy = Proxy(binary, work, "odd", backends, extra=odd)
        proxies.append(proxy)
        browser.navigate(f"http://{proxy.admin}/")
        check_odd_names(browser, proxy, addresses[0])
        if shots:
            browser.screenshot(os.path.join(shots, "2-odd-names.png"))
        print(f"dashboard: odd names are shown as text and their buttons work ({time.monotonic() - started:.1f} s)")

        # With a token: the page asks for it.
        proxy = Proxy(binary, work, "locked", backends, token=TOKEN)
        proxies.append(proxy)
        browser.navigate(f"http://{proxy.admin}/")
        browser.wait_for(
            "the token field",
            "document.getElementById('tokenbox').classList.contains('show')"
            " && document.getElementById('main').hidden",
        )
        if shots:
            browser.screenshot(os.path.join(shots, "3-token.png"))
        browser.type_into("#token", "not-the-right-token-at-all")
        browser.click("#tokenform button[type=submit]")
        browser.wait_for(
            "a wrong token to be refused",
            "document.getElementById('tokenwhy').textContent.includes('refused')",
        )
        browser.type_into("#token", TOKEN)
        browser.click("#tokenform button[type=submit]")
        check_backends_listed(browser, addresses)
        stored = browser.eval(f"sessionStorage.getItem('switchyard.admin.token') === {json.dumps(TOKEN)}")
        if not stored:
            raise Failure("the token is not kept in sessionStorage")
        click_and_check(browser, proxy, addresses[0], "drain", "draining", "draining")
        print(f"dashboard: the token is asked for and used ({time.monotonic() - started:.1f} s)")

        # The API goes away: the banner says so.
        proxy.stop()
        browser.wait_for(
            "the error banner",
            "document.getElementById('banner').classList.contains('show')",
        )
        if shots:
            browser.screenshot(os.path.join(shots, "4-unreachable.png"))
        errors = browser.exceptions()
        if errors:
            raise Failure(f"the page threw: {errors}")
        print(f"dashboard: all checks passed in {time.monotonic() - started:.1f} s")
        return 0
    except Failure as failure:
        print(f"dashboard test FAILED: {failure}", file=sys.stderr)
        for proxy in proxies:
            print(f"--- {proxy.log_path}\n{proxy.read_log()[-4000:]}", file=sys.stderr)
        return 1
    finally:
        if browser:
            browser.close()
        for proxy in proxies:
            proxy.stop()
        for backend in backends:
            backend.shutdown()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
