"""Open a report in headless Chromium: check it loads cleanly, and save a PNG screenshot.

``python -m analysis.browser reports/report.html`` (``nox -s screenshot``) starts
Chromium headless with ``--remote-debugging-pipe`` and drives it through the DevTools
protocol over that pipe (JSON messages separated by NUL bytes on file descriptors 3 and
4; only the standard library is needed). It

1. loads the page from its ``file://`` URL in a fresh profile, with the flags that stop
   Chromium calling home (background networking, component updates, sync, QUIC) set;
2. collects every console error, uncaught exception and browser log error while the
   page loads (``Runtime.consoleAPICalled``, ``Runtime.exceptionThrown``, ``Log.entryAdded``);
3. checks every ``<img>``: it must decode (``img.decode()`` resolves) and have a natural size;
4. captures the whole page as a PNG (a page taller than ``--max-height`` pixels is scaled
   down to fit, not cut), written atomically.

Exit status 0 when the page is clean, 1 with the list of problems otherwise, 2 when
Chromium cannot be found or started.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import json
import os
import pathlib
import queue
import shutil
import subprocess
import sys
import tempfile
import threading
import time

from bkn.probes.results import atomic_path

CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")
# Headless, sandbox off (containers run as root), and nothing that reaches the network.
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--disable-extensions",
    "--disable-default-apps",
    "--mute-audio",
    "--hide-scrollbars",
    "--no-default-browser-check",
    "--disable-features=Translate,MediaRouter,OptimizationHints",
]

IMAGE_CHECK = """
(async () => {
  const images = Array.from(document.images);
  const results = await Promise.all(images.map(async (img, i) => {
    let decoded = true, reason = "";
    try { await img.decode(); } catch (e) { decoded = false; reason = String(e); }
    return {index: i, alt: (img.alt || "").slice(0, 80), src: (img.getAttribute("src") || "").slice(0, 40),
            decoded, reason, width: img.naturalWidth, height: img.naturalHeight};
  }));
  return {count: images.length, bad: results.filter(r => !r.decoded || r.width === 0 || r.height === 0),
          title: document.title, height: document.documentElement.scrollHeight};
})()
"""


class BrowserError(RuntimeError):
    """Chromium could not be found, started, or driven."""


def find_chromium(explicit: str | None = None) -> str:
    """The Chromium executable: ``explicit`` (only it, when given), else $CHROMIUM, else the usual names."""
    if explicit:
        path = shutil.which(explicit)
        if not path:
            raise BrowserError(f"Chromium executable {explicit!r} not found")
        return path
    for candidate in [os.environ.get("CHROMIUM", "")] + list(CHROMIUM_NAMES):
        if candidate:
            path = shutil.which(candidate)
            if path:
                return path
    raise BrowserError(
        "no Chromium found (looked for " + ", ".join(CHROMIUM_NAMES) + "; set CHROMIUM or pass "
        "--chromium). On Debian/Ubuntu: `apt-get install -y chromium`."
    )


def _high_fd(fd: int) -> int:
    high = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
    os.close(fd)
    return high


class DevTools:
    """A minimal DevTools-protocol client over Chromium's ``--remote-debugging-pipe``."""

    def __init__(self, chromium: str, profile: str, extra_flags: list[str] = ()):
        to_child_r, self._to_child = os.pipe()
        self._from_child, from_child_w = os.pipe()
        # The child's ends move to fds >= 10 first, so putting them on 3 and 4 cannot clobber one another.
        to_child_r, from_child_w = _high_fd(to_child_r), _high_fd(from_child_w)

        def on_3_and_4():  # runs in the child between fork and exec: Chromium reads fd 3, writes fd 4
            os.dup2(to_child_r, 3)
            os.dup2(from_child_w, 4)
            os.close(to_child_r)
            os.close(from_child_w)

        args = [
            chromium,
            *FLAGS,
            *extra_flags,
            f"--user-data-dir={profile}",
            "--remote-debugging-pipe",
            "about:blank",
        ]
        self.stderr = tempfile.TemporaryFile()
        try:
            # close_fds=False: the fds made in on_3_and_4 must survive; every other fd Python opened is
            # close-on-exec anyway (PEP 446).
            self.process = subprocess.Popen(
                args,
                preexec_fn=on_3_and_4,
                close_fds=False,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=self.stderr,
            )
        except OSError as exc:
            raise BrowserError(f"cannot start {chromium}: {exc}") from exc
        finally:
            os.close(to_child_r)
            os.close(from_child_w)
        self._next_id = 0
        self._replies: dict[int, dict] = {}
        self._events: queue.Queue = queue.Queue()
        self._lock = threading.Condition()
        self._closed = False
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        buffer = b""
        while True:
            try:
                chunk = os.read(self._from_child, 1 << 16)
            except OSError:
                chunk = b""
            if not chunk:
                with self._lock:
                    self._closed = True
                    self._lock.notify_all()
                return
            buffer += chunk
            while b"\0" in buffer:
                raw, buffer = buffer.split(b"\0", 1)
                message = json.loads(raw)
                if "id" in message:
                    with self._lock:
                        self._replies[message["id"]] = message
                        self._lock.notify_all()
                else:
                    self._events.put(message)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60.0):
        with self._lock:
            self._next_id += 1
            ident = self._next_id
        message = {"id": ident, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        try:
            os.write(self._to_child, json.dumps(message).encode() + b"\0")
        except OSError as exc:
            raise BrowserError(f"Chromium closed the DevTools pipe ({exc}); its stderr:\n{self.stderr_text()}")
        deadline = time.monotonic() + timeout
        with self._lock:
            while ident not in self._replies:
                if self._closed:
                    raise BrowserError(f"Chromium exited during {method}; its stderr:\n{self.stderr_text()}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise BrowserError(f"no reply from Chromium to {method} within {timeout:.0f} s")
                self._lock.wait(left)
            reply = self._replies.pop(ident)
        if "error" in reply:
            raise BrowserError(f"{method} failed: {reply['error']}")
        return reply.get("result", {})

    def events(self, timeout: float):
        """Yield events until ``timeout`` seconds pass without one."""
        while True:
            try:
                yield self._events.get(timeout=timeout)
            except queue.Empty:
                return

    def stderr_text(self) -> str:
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-3000:]

    def close(self) -> None:
        try:
            if self.process.poll() is None:
                try:
                    self.send("Browser.close", timeout=5)
                except BrowserError:
                    pass
                try:
                    self.process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self.process.kill()
                    self.process.wait()
        finally:
            for fd in (self._to_child, self._from_child):
                try:
                    os.close(fd)
                except OSError:
                    pass
            self.stderr.close()


def _describe(event: dict) -> str | None:
    """The text of an event that is an error on the page, else None."""
    method, params = event.get("method"), event.get("params", {})
    if method == "Runtime.exceptionThrown":
        details = params.get("exceptionDetails", {})
        exception = details.get("exception", {})
        return "uncaught exception: " + str(exception.get("description") or details.get("text"))
    if method == "Runtime.consoleAPICalled" and params.get("type") in ("error", "assert"):
        texts = [str(a.get("value", a.get("description", ""))) for a in params.get("args", [])]
        return f"console.{params['type']}: " + " ".join(texts)
    if method == "Log.entryAdded" and params.get("entry", {}).get("level") == "error":
        entry = params["entry"]
        return f"browser log ({entry.get('source')}): {entry.get('text')} {entry.get('url', '')}".strip()
    return None


def _save_screenshot(tools, session, target: pathlib.Path, page_height, width, max_height, timeout) -> None:
    """The whole page as a PNG (atomically); a page taller than ``max_height`` is scaled down to fit, not cut."""
    height = int(max(page_height, 600))
    scale = min(1.0, max_height / height)
    tools.send(
        "Emulation.setDeviceMetricsOverride",
        {"width": width, "height": min(height, 4000), "deviceScaleFactor": 1, "mobile": False},
        session=session,
    )
    shot = tools.send(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": width, "height": height, "scale": scale},
        },
        session=session,
        timeout=timeout,
    )
    with atomic_path(target) as tmp:
        tmp.write_bytes(base64.b64decode(shot["data"]))


def check_page(
    html: pathlib.Path,
    screenshot: pathlib.Path | None,
    *,
    chromium: str | None = None,
    width: int = 1280,
    max_height: int = 16000,
    timeout: float = 60.0,
) -> dict:
    """Load ``html`` in headless Chromium; return ``{"errors": [...], "images": n, "bad_images": [...]}``.

    Writes the screenshot (PNG, atomically) when ``screenshot`` is given.
    """
    html = pathlib.Path(html).resolve()
    if not html.is_file():
        raise BrowserError(f"no such page: {html} (build it first: `nox -s report`)")
    binary = find_chromium(chromium)
    errors: list[str] = []
    with tempfile.TemporaryDirectory(prefix="bkn-chromium-") as profile:
        tools = DevTools(binary, profile)
        try:
            target = tools.send("Target.createTarget", {"url": "about:blank"})["targetId"]
            session = tools.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Log"):
                tools.send(f"{domain}.enable", session=session)
            tools.send(
                "Emulation.setDeviceMetricsOverride",
                {"width": width, "height": 900, "deviceScaleFactor": 1, "mobile": False},
                session=session,
            )
            tools.send("Page.navigate", {"url": html.as_uri()}, session=session)
            deadline, loaded = time.monotonic() + timeout, False
            for event in tools.events(timeout=timeout):
                problem = _describe(event)
                if problem:
                    errors.append(problem)
                if event.get("method") == "Page.loadEventFired":
                    loaded = True
                    break
                if time.monotonic() > deadline:
                    break
            if not loaded:
                raise BrowserError(f"{html} did not finish loading within {timeout:.0f} s")
            check = tools.send(
                "Runtime.evaluate",
                {"expression": IMAGE_CHECK, "awaitPromise": True, "returnByValue": True},
                session=session,
                timeout=timeout,
            )
            if "exceptionDetails" in check:
                raise BrowserError(f"the image check script failed: {check['exceptionDetails']}")
            images = check["result"]["value"]
            for event in tools.events(timeout=0.5):  # errors raised while images decoded
                problem = _describe(event)
                if problem:
                    errors.append(problem)
            if screenshot is not None:
                _save_screenshot(tools, session, pathlib.Path(screenshot), images["height"], width, max_height, timeout)
        finally:
            tools.close()
    return {
        "errors": errors,
        "images": images["count"],
        "bad_images": images["bad"],
        "title": images["title"],
        "height": images["height"],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m analysis.browser",
        description="Open a report in headless Chromium, check that it loads without "
        "console errors and that every image decodes, and save a screenshot.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument(
        "html",
        nargs="?",
        type=pathlib.Path,
        default=pathlib.Path("reports/report.html"),
        help="the page to check",
    )
    p.add_argument(
        "--screenshot",
        type=pathlib.Path,
        default=None,
        help="PNG to write (default: the page's name with .png)",
    )
    p.add_argument("--no-screenshot", action="store_true", help="only check, write no PNG")
    p.add_argument("--chromium", help="Chromium executable (default: $CHROMIUM, then chromium on PATH)")
    p.add_argument("--width", type=int, default=1280, help="viewport width in CSS pixels")
    p.add_argument("--max-height", type=int, default=16000, help="taller pages are scaled down to this many pixels")
    p.add_argument("--timeout", type=float, default=60.0, help="seconds to wait for the page")
    args = p.parse_args(argv)
    shot = None if args.no_screenshot else (args.screenshot or args.html.with_suffix(".png"))
    try:
        result = check_page(
            args.html,
            shot,
            chromium=args.chromium,
            width=args.width,
            max_height=args.max_height,
            timeout=args.timeout,
        )
    except BrowserError as exc:
        print(f"browser check could not run: {exc}", file=sys.stderr)
        return 2
    problems = list(result["errors"]) + [
        f"image {b['index']} ({b['alt'] or b['src']!r}) did not decode: {b['reason'] or 'zero natural size'}"
        for b in result["bad_images"]
    ]
    print(f"{args.html}: title {result['title']!r}, {result['images']} images, page height {result['height']} px")
    if shot is not None:
        print(f"Screenshot written: {shot.resolve()}")
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {args.html}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print(f"OK: no console errors, all {result['images']} images decoded.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
