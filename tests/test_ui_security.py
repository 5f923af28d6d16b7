"""Issue 25: `cav ui` as an attacker on this machine tries it, over plain HTTP against a real server on a free
loopback port (every request bounded by a timeout). The cross-origin page is in test_ui_browser.py.

Each test is one finding of the issue: it fails on gradio 3.36 (the old server) and passes now.
"""

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("gradio")

SECRET = "the-secret-of-the-working-folder"
TIMEOUT = httpx.Timeout(10.0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(tmp: Path, *flags, env=None):
    """`cav ui` started from a working folder holding a secret, with its own TMPDIR (to see what it leaves)."""
    cwd, tmpdir, runs = tmp / "checkout", tmp / "tmp", tmp / "runs"
    for d in (cwd, tmpdir, runs):
        d.mkdir(parents=True, exist_ok=True)
    (cwd / "secret.txt").write_text(SECRET)
    port = _free_port()
    log = tmp / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "TMPDIR": str(tmpdir), **(env or {})}
    proc = subprocess.Popen([sys.executable, "-m", "cav.cli", "ui", "--port", str(port), "--runs", str(runs), *flags],
                            cwd=cwd, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 120
    while f"cav ui: {url}" not in log.read_text():
        assert proc.poll() is None and time.time() < deadline, log.read_text()
        time.sleep(0.3)
    return proc, url, port, runs, tmpdir


def _stop(proc) -> None:
    proc.terminate()
    proc.wait(timeout=60)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sec")
    outside = tmp / "outside.png"
    outside.write_text(SECRET)
    proc, url, port, runs, tmpdir = _start(tmp, "--max-upload-mb", "1")
    (runs / "link.png").symlink_to(outside)  # a symlink in the runs folder to a file outside it
    yield url, port, runs, tmp
    _stop(proc)


def get(url, **kw):
    return httpx.get(url, timeout=TIMEOUT, **kw)


def test_the_working_folder_and_symlinks_are_not_served(server):
    url, _, runs, tmp = server
    secret = tmp / "checkout" / "secret.txt"
    (runs / "page.html").write_text("<script>document.title='owned'</script>" + SECRET)  # a page in --runs
    for path in (f"/gradio_api/file={secret}", "/gradio_api/file=secret.txt", f"/file={secret}", "/file=secret.txt",
                 f"/gradio_api/file/{secret}", f"/gradio_api/file/{runs / 'page.html'}", "/cav/runs/page.html",
                 f"/gradio_api/file={runs / 'page.html'}",
                 "/cav/runs/link.png", f"/gradio_api/file={runs / 'link.png'}", "/cav/runs/../checkout/secret.txt",
                 "/gradio_api/file=/etc/passwd"):
        r = get(url + path)
        assert r.status_code in (403, 404) and SECRET not in r.text and "root:" not in r.text, path


def test_no_url_is_fetched_and_the_server_stays_up(server):
    url, port, *_ = server
    for target in (f"http://127.0.0.1:{port}/x", "https://example.invalid/x", f"//127.0.0.1:{port}/"):
        t0 = time.time()
        r = get(f"{url}/gradio_api/file={target}")
        assert r.status_code == 403 and r.text == "cav ui serves only its own files"
        assert time.time() - t0 < 5
        for route in ("/file=", "/gradio_api/file/", "/gradio_api/proxy="):
            assert get(f"{url}{route}{target}").status_code in (403, 404), route
    assert get(url + "/config").status_code == 200  # not frozen


def test_same_origin_only(server):
    url, port, *_ = server
    other = f"http://127.0.0.1:{_free_port()}"
    r = get(url + "/config", headers={"Origin": other})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    r = httpx.options(url + "/gradio_api/queue/join", timeout=TIMEOUT,
                      headers={"Origin": other, "Access-Control-Request-Method": "POST"})
    assert r.status_code == 403 and "access-control-allow-origin" not in r.headers
    # a page on another port of this host is "same-site" for the browser: refused too, with or without Origin
    assert get(url + "/config", headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
    # a link to the app on another page still opens it (a top-level navigation to its page), and only that
    opening = {"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "navigate"}
    assert get(url + "/", headers=opening).status_code == 200
    assert get(url + "/logout", headers=opening).status_code == 403
    # DNS rebinding: another host name that resolves here
    assert get(url + "/config", headers={"Host": f"attacker.example:{port}"}).status_code == 403
    # the page's own requests pass
    assert get(url + "/config", headers={"Origin": url, "Sec-Fetch-Site": "same-origin"}).status_code == 200
    # a websocket with a foreign origin is refused before the handshake
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall((f"GET /gradio_api/queue/join HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\n"
                   f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n"
                   f"Origin: {other}\r\n\r\n").encode())
        assert s.recv(200).split(b"\r\n")[0] != b"HTTP/1.1 101 Switching Protocols"


def _call(url: str, api_name: str, data: list) -> str:
    """One event over Gradio's queue (as the page sends it); returns the whole event stream's text."""
    config = get(url + "/config").json()
    fn = next(d["id"] for d in config["dependencies"] if d.get("api_name") == api_name)
    session = uuid.uuid4().hex
    r = httpx.post(url + "/gradio_api/queue/join", timeout=TIMEOUT,
                   json={"data": data, "fn_index": fn, "session_hash": session, "event_data": None})
    assert r.status_code == 200, r.text
    text = ""
    with httpx.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session},
                      timeout=httpx.Timeout(60.0)) as stream:
        for line in stream.iter_lines():
            text += line + "\n"
            if "process_completed" in line:
                break
    return text


def test_a_posted_server_path_is_never_read_nor_echoed(server):
    url, *_ = server
    for path in ("/etc/passwd", str(server[3] / "checkout" / "secret.txt")):
        clip = {"path": path, "orig_name": "passwd", "meta": {"_type": "gradio.FileData"}}
        said = _call(url, "preview0", [clip, None, 0, 0, 0, 4, "32", "crop"])
        assert "process_completed" in said and "root:" not in said and SECRET not in said and path not in said


def test_uploads_are_capped_and_never_served_as_a_page(server):
    url, *_ = server
    r = httpx.post(url + "/gradio_api/upload", timeout=TIMEOUT,
                   files={"files": ("big.mp4", b"\0" * (2 * 1024 * 1024), "video/mp4")})
    assert r.status_code == 413, r.text  # --max-upload-mb 1
    page = b"<html><script>document.title='owned'</script></html>"
    r = httpx.post(url + "/gradio_api/upload", timeout=TIMEOUT, files={"files": ("x.html", page, "text/html")})
    assert r.status_code == 200, r.text
    served = get(f"{url}/gradio_api/file={r.json()[0]}")
    assert served.status_code == 200 and served.content == page  # the upload itself, but not as a page:
    assert served.headers["content-type"] != "text/html" and "attachment" in served.headers["content-disposition"]
    assert served.headers["content-security-policy"] == "sandbox" and served.headers["x-content-type-options"] == \
        "nosniff"


def test_every_script_is_the_server_s_own(server):
    """Nothing loads from a CDN (a script from elsewhere, changed there, would run as this app)."""
    import re

    page = get(server[0] + "/").text
    for src in re.findall(r"<script[^>]*\bsrc=[\"']([^\"']+)", page):
        assert not re.match(r"^(?:[a-z]+:)?//", src), src


def test_login_is_required_off_loopback_rate_limited_and_the_password_is_not_in_argv(tmp_path):
    secret = "pw-" + uuid.uuid4().hex
    proc, url, port, runs, tmpdir = _start(tmp_path, "--auth", "alice", env={"CAV_UI_PASSWORD": secret})
    try:
        assert secret not in Path(f"/proc/{proc.pid}/cmdline").read_text()
        assert httpx.post(url + "/gradio_api/upload", timeout=TIMEOUT, files={"files": ("a.mp4", b"0")}
                          ).status_code == 401  # nothing without the login
        user = httpx.Client(timeout=TIMEOUT)
        login = lambda client, pw: client.post(url + "/login", data={"username": "alice", "password": pw})
        assert login(user, secret).status_code == 200
        assert [login(httpx, "wrong").status_code for _ in range(5)] == [400] * 5
        assert login(httpx, secret).status_code == 429  # the right password too, until the minute is over
        upload = user.post(url + "/gradio_api/upload", files={"files": ("a.mp4", b"0" * 10, "video/mp4")})
        assert upload.status_code == 200
        private = list(tmpdir.glob("cav-ui-*"))
        assert len(private) == 1 and oct(private[0].stat().st_mode)[-3:] == "700"  # this user's only
        assert Path(upload.json()[0]).is_relative_to(private[0])  # gradio's uploads are inside it
        assert not (tmpdir / "gradio").exists()
    finally:
        _stop(proc)
    assert not list(tmpdir.glob("cav-ui-*")) and not (tmpdir / "gradio").exists()  # gone with the server
