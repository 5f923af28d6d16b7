"""`cav ui` in a real browser: a server on a free local port driven by headless Chromium (Debian's chromium and
chromium-driver, through Selenium). Screenshots of every step go to a temporary folder, printed at the start.

Skipped (and only these tests) when Chromium, its driver, gradio or selenium is missing.
"""

import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
DRIVER = shutil.which("chromedriver")
_missing = [n for n, ok in (("chromium", CHROMIUM), ("chromedriver", DRIVER)) if not ok]
for _mod in ("gradio", "selenium"):
    try:
        __import__(_mod)
    except ImportError:
        _missing.append(_mod)
pytestmark = pytest.mark.skipif(bool(_missing), reason=f"browser tests need {', '.join(_missing)} "
                                "(apt-get install chromium chromium-driver; pip install -e '.[dev]')")

PROMPT = "a red square moving right on a navy background"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    folder = tmp_path_factory.mktemp("ui-screenshots")
    print(f"\nscreenshots: {folder}")
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """`cav ui` on the toy base, as a user starts it."""
    runs = tmp_path_factory.mktemp("ui") / "runs"
    port = _free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log = open(runs.parent / "server.log", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "cav.cli", "ui", "--port", str(port), "--runs", str(runs)],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/"
    deadline = time.time() + 120
    while f"cav ui: {url[:-1]}" not in (runs.parent / "server.log").read_text():
        assert proc.poll() is None and time.time() < deadline, (runs.parent / "server.log").read_text()
        time.sleep(0.5)
    yield url, runs
    proc.terminate()
    proc.wait(timeout=60)
    log.close()


@pytest.fixture(scope="module")
def browser(server):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1500",
                "--autoplay-policy=no-user-gesture-required"):
        opts.add_argument(arg)
    driver = webdriver.Chrome(service=Service(DRIVER), options=opts)
    driver.get(server[0])
    yield driver
    driver.quit()


class Page:
    """The few things the tests do on the page, by element id (``layout.py``'s elem_ids)."""

    def __init__(self, driver, shots: Path):
        self.d, self.shots = driver, shots

    def wait(self, cond, what: str, timeout: float = 60):
        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                value = cond()
            except Exception:  # the element is being re-rendered: look again
                value = None
            if value:
                return value
            time.sleep(0.25)
        self.shot(f"timeout-{what.replace(' ', '-')}")
        raise AssertionError(f"timed out waiting for {what}; page says: {self.text('train-status')!r} "
                             f"{self.text('job-status')!r} {self.text('preview-status')!r}")

    def el(self, css: str):
        from selenium.webdriver.common.by import By

        return self.d.find_element(By.CSS_SELECTOR, css)

    def text(self, elem_id: str) -> str:
        try:
            return self.el(f"#{elem_id}").text
        except Exception:
            return ""

    def type(self, css: str, value) -> None:
        from selenium.webdriver.common.keys import Keys

        box = self.wait(lambda: self.el(css), css)  # gradio 6 renders an accordion's fields after it opens
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(str(value))
        box.send_keys(Keys.TAB)

    def upload(self, path: Path) -> None:
        clear = self.d.find_elements("css selector", "#clip-upload button[aria-label='Clear']")
        if clear:
            clear[0].click()
            self.wait(lambda: not self.d.find_elements("css selector", "#clip-upload button[aria-label='Clear']"),
                      "the upload to clear")
        self.el("#clip-upload input[type=file]").send_keys(str(path))

    def tab(self, name: str) -> None:
        self.d.find_element("xpath", f"//button[@role='tab' and contains(., '{name}')]").click()

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.d.save_screenshot(str(path))
        return path


@pytest.fixture(scope="module")
def page(browser, shots):
    return Page(browser, shots)


def test_page_loads(page):
    page.wait(lambda: page.d.find_elements("css selector", "#start"), "the Train tab")
    assert "no training started" in page.wait(lambda: page.text("job-status"), "the job status")
    page.shot("01-loaded")


def test_a_text_file_as_clip_shows_the_cli_error_and_the_page_stays_usable(page, tmp_path, tiny_video):
    notes = tmp_path / "notes.txt"
    notes.write_text("not a video")
    page.upload(notes)
    line = page.wait(lambda: "cav: error:" in page.text("preview-status") and page.text("preview-status"),
                     "the bad-clip error")
    assert "notes.txt' is not a video ffmpeg can read" in line and "pass a video file" in line
    page.shot("02-not-a-video")
    # the same page goes on: the test clip has 6 frames, fewer than the toy recipe's 8 → the CLI's message
    page.upload(tiny_video)
    line = page.wait(lambda: "fewer than" in page.text("preview-status") and page.text("preview-status"),
                     "the too-short error")
    assert "has 6 frames, fewer than --frames 8: pass --frames 6 or a longer video" in line
    page.type("#trim-frames input", 4)
    assert "preview: 4 frames" in page.wait(lambda: "preview:" in page.text("preview-status")
                                            and page.text("preview-status"), "the preview")
    page.shot("03-preview")


def test_train_then_generate(page, server):
    page.el("#start").click()  # no prompt yet
    assert page.wait(lambda: "cav:" in page.text("train-status") and page.text("train-status"),
                     "the empty-prompt error") == \
        "cav: error: the prompt is empty: pass --prompt 'a description of the video and its motion'"
    page.el("#prompt textarea").send_keys(PROMPT)
    page.d.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'advanced recipe fields')]").click()
    for field, value in {"steps": 2, "absorber_steps": 2, "checkpoint_every": 1, "sample_steps": 2}.items():
        page.type(f"#field-{field} input", value)
    page.el("#start").click()
    assert page.wait(lambda: "started" in page.text("train-status") and page.text("train-status"), "the start") \
        == f"started training 'run-001' in {server[1].resolve() / 'run-001'}"
    page.el("#start").click()  # a second training while one runs
    assert "a training is already running ('run-001')" in page.wait(
        lambda: "already" in page.text("train-status") and page.text("train-status"), "the one-at-a-time error")
    assert page.wait(lambda: "absorbers step" in page.text("progress") or "t_lora step" in page.text("progress"),
                     "progress", timeout=120)
    page.wait(lambda: page.el("#train-sample video").get_attribute("src"), "a validation sample", timeout=120)
    page.wait(lambda: "finished" in page.text("job-status"), "the end of training", timeout=120)
    assert "t_lora step 2/2 · 4/4 steps in all" in page.text("progress")
    page.d.execute_script("document.getElementById('progress').scrollIntoView()")
    page.shot("04-trained")

    page.tab("Generate")
    page.el("#gen-refresh").click()
    page.el("#gen-adapters input").click()
    page.wait(lambda: [o for o in page.d.find_elements("css selector", "#gen-adapters li") if o.text == "run-001"],
              "the run in the adapter list")[0].click()
    page.el("#gen-prompt textarea").send_keys("a green circle moving right on a grey background")
    page.type("#gen-frames input", 4)
    page.type("#gen-steps input", 2)
    page.type("#gen-weights textarea", "0.5, 1")
    page.el("#gen-start").click()
    page.wait(lambda: "2 video(s)" in page.text("gen-status"), "the generated grid", timeout=120)
    playable = page.wait(lambda: page.d.execute_script(
        "const v = [...document.querySelectorAll('#gen-grid video')];"
        "return v.length === 2 && v.every(x => x.readyState >= 1 && !x.error) ? v.map(x => x.currentSrc) : null"),
        "playable videos")
    # issue 28: written under --runs (generations/), served from there by a relative route (no server path)
    assert all(src.endswith(".mp4") and "/cav/runs/generations/" in src for src in playable)
    assert len(list((server[1] / "generations").glob("*/w*-seed0.mp4"))) == 2
    page.shot("05-generated")

    # issue 28: the Runs tab shows the run's contact sheet whole (not a cropped thumbnail) and lists the generation
    page.tab("Runs")
    page.el("#runs-refresh").click()
    page.el("#runs-pick input").click()
    page.wait(lambda: [o for o in page.d.find_elements("css selector", "#runs-pick li") if o.text == "run-001"],
              "the run in the runs list")[0].click()
    sheet = page.wait(lambda: page.d.execute_script(
        "const i = document.querySelector('#runs-sheets img');"
        "return i && i.complete && i.naturalWidth ? [i.naturalWidth, i.naturalHeight, getComputedStyle(i).objectFit,"
        " i.clientWidth] : null"), "the contact sheet")
    assert sheet[1] >= 2 * 128 and sheet[2] == "contain" and sheet[3] > 600, sheet  # rows of ≥128-px frames, wide
    page.el("#runs-generations input").click()
    page.wait(lambda: page.d.find_elements("css selector", "#runs-generations li"), "the generations list")[0].click()
    page.wait(lambda: len(page.d.find_elements("css selector", "#runs-generation video")) == 2, "the generation")
    page.shot("06-runs")


ATTACKER = """<!doctype html><title>running</title><script>
const app = "APP", body = BODY, out = {};
(async () => {
  try { await (await fetch(app + "/config")).text(); out.read = "allowed"; } catch (e) { out.read = "blocked"; }
  try {
    const r = await fetch(app + "/gradio_api/queue/join", {method: "POST", credentials: "include",
                          headers: {"Content-Type": "application/json"}, body: JSON.stringify(body)});
    out.start = "sent " + r.status;
  } catch (e) { out.start = "blocked"; }
  const img = new Image();  // a plain <img>: no CORS, so only the server can refuse it
  img.onload = () => { out.img = "loaded"; document.title = "done " + JSON.stringify(out); };
  img.onerror = () => { out.img = "refused"; document.title = "done " + JSON.stringify(out); };
  img.src = app + "/gradio_api/file=/etc/passwd";
})();
</script>"""


def _start_payload(url: str, name: str) -> dict:
    """What the page sends for Start training (the toy clip, tiny steps), built from the page's own config."""
    import json
    import urllib.request

    config = json.load(urllib.request.urlopen(url + "config", timeout=10))
    dep = next(d for d in config["dependencies"] if d.get("api_name") == "start")
    values = {c["id"]: c.get("props", {}).get("value") for c in config["components"]}
    data = [values[i] for i in dep["inputs"]]
    labels = {c["id"]: c.get("props", {}).get("elem_id") for c in config["components"]}
    by_id = {labels[i]: k for k, i in enumerate(dep["inputs"])}
    data[by_id["toy-clip"]], data[by_id["prompt"]], data[by_id["run-name"]] = "red circle, spiral", PROMPT, name
    for field, value in {"steps": 1, "absorber_steps": 1, "checkpoint_every": 1, "sample_steps": 1}.items():
        data[by_id[f"field-{field}"]] = value
    return {"data": data, "fn_index": dep["id"], "session_hash": "attacker", "event_data": None,
            "trigger_id": dep["targets"][0][0]}


def test_a_page_on_another_local_port_cannot_read_drive_or_fetch(page, server):
    """Issue 25: with ``Access-Control-Allow-Origin: *`` (gradio 3) or any localhost origin allowed (gradio 6),
    a page on another local port read the app and started trainings; now only the app's own page can."""
    import http.server
    import json
    import threading
    import urllib.request

    url, runs = server
    payload = _start_payload(url, "xorigin")
    html = ATTACKER.replace("APP", url.rstrip("/")).replace("BODY", json.dumps(payload)).encode()

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.end_headers()
            self.wfile.write(html)

        def log_message(self, *args):
            pass

    evil = http.server.HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=evil.serve_forever, daemon=True).start()
    try:
        page.d.get(f"http://127.0.0.1:{evil.server_address[1]}/")
        said = page.wait(lambda: page.d.title.startswith("done") and page.d.title, "the attacker page", timeout=30)
        assert json.loads(said[5:]) == {"read": "blocked", "start": "blocked", "img": "refused"}
        time.sleep(3)
        assert not (runs / "xorigin").exists()  # nothing was started
    finally:
        evil.shutdown()
    # the same request from the app's own origin does start the training: the payload was a real one
    req = urllib.request.Request(url + "gradio_api/queue/join", data=json.dumps(payload).encode(),
                                 headers={"Content-Type": "application/json"})
    assert urllib.request.urlopen(req, timeout=10).status == 200
    deadline = time.time() + 60
    while not (runs / "xorigin").exists():
        assert time.time() < deadline, "the same-origin start did not start"
        time.sleep(0.5)
    page.d.get(url)
