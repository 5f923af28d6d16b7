"""Make docs/img/ui-train.png: `cav ui` on the toy model trains on a toy-world clip, then headless Chromium takes a
picture of the Train tab.

    python scripts/ui_screenshot.py [OUT.png]     (needs chromium + chromium-driver and the `dev` extra)
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.keys import Keys

OUT = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "img" / "ui-train.png")
RECIPE = {"absorber_steps": 10, "steps": 20, "checkpoint_every": 10, "t_lora_batch": 1}  # a picture, not a result


def wait(cond, timeout=1800):
    deadline = time.time() + timeout
    while time.time() < deadline:
        try:
            if cond():
                return
        except Exception:  # re-rendered element: look again
            pass
        time.sleep(0.5)
    raise SystemExit("timed out")


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a timeout still stops the server below
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    runs = Path(tempfile.mkdtemp()) / "runs"
    server = subprocess.Popen([sys.executable, "-m", "cav.cli", "ui", "--port", str(port), "--runs", str(runs)],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    while "cav ui:" not in server.stdout.readline():
        pass
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,2300"):
        opts.add_argument(arg)
    d = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    try:
        d.get(f"http://127.0.0.1:{port}/")
        wait(lambda: d.find_elements("css selector", "#toy-clip input"))
        d.find_element("css selector", "#toy-clip input").click()
        wait(lambda: [o for o in d.find_elements("css selector", "#toy-clip li") if "spiral" in o.text][0].click()
             or True)
        wait(lambda: "preview:" in d.find_element("id", "preview-status").text)
        d.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'advanced recipe fields')]").click()
        for field, value in RECIPE.items():
            box = d.find_element("css selector", f"#field-{field} input")
            box.send_keys(Keys.CONTROL, "a")
            box.send_keys(str(value), Keys.TAB)
        d.find_element("xpath", "//*[@id='advanced']//*[contains(text(), 'advanced recipe fields')]").click()
        d.find_element("id", "start").click()
        wait(lambda: "finished" in d.find_element("id", "job-status").text)
        wait(lambda: d.find_element("css selector", "#train-sample video").get_attribute("src"))
        d.execute_script("window.scrollTo(0, 0)")
        time.sleep(2)  # let the videos show a frame
        OUT.parent.mkdir(parents=True, exist_ok=True)
        d.save_screenshot(str(OUT))
        print(f"wrote {OUT}")
    finally:
        d.quit()
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
