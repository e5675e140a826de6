"""Make ``docs/serve.png``: ``clp serve``'s page on a trained checkpoint, after one generation, in headless Chromium.

    clp quickstart --run-dir runs/quickstart          # or any run with a checkpoint and evaluation/latest.json
    python docs/serve_screenshot.py --config runs/quickstart/rl/config.yaml \\
        --ckpt_path runs/quickstart/rl/checkpoints/last.ckpt --output docs/serve.png

Needs Debian's ``chromium`` and ``chromium-driver`` and ``pip install -e '.[browser-test]'``; nothing is downloaded
(Selenium is given the driver's path, so Selenium Manager does not run). The browser is set up as in
``tests/test_serve.py``.
"""

from __future__ import annotations

import argparse
import tempfile
import threading

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from clp_lightning.serve import Limits, make_server
from clp_lightning.serve.backends import from_checkpoint

PROMPT = ("SUBREDDIT: r/cooking\n\nTITLE: Rescued a salty soup\n\nPOST: I made a big pot of lentil soup for friends "
          "and added far too much salt. I did not want to throw it away, so I added a peeled potato, more water and "
          "some lemon juice, let it simmer for twenty minutes and took the potato out. It was good again and "
          "nobody noticed.\n\nTL;DR:")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", action="append", required=True)
    parser.add_argument("--ckpt_path", required=True)
    parser.add_argument("--output", default="docs/serve.png")
    parser.add_argument("--weight", type=float, default=0.7, help="the first objective's weight to generate at")
    parser.add_argument("--max_new_tokens", type=int, default=48)
    args = parser.parse_args()
    backend = from_checkpoint(args.config, args.ckpt_path, [], args.max_new_tokens)
    server = make_server(backend, "127.0.0.1", 0, Limits(max_new_tokens=args.max_new_tokens))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    options = webdriver.ChromeOptions()
    options.binary_location = "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as profile:
        for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--disable-background-networking", "--disable-component-update", "--disable-sync",
                     "--no-first-run", f"--user-data-dir={profile}", "--window-size=1280,940",
                     "--hide-scrollbars"):
            options.add_argument(flag)
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
            wait = WebDriverWait(driver, 30)
            wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-ready") == "true")
            slider = driver.find_element(By.ID, "slider-0")
            driver.execute_script("arguments[0].value = arguments[1]; arguments[0].dispatchEvent(new Event('input'))",
                                  slider, round(args.weight * 1000))
            driver.find_element(By.ID, "prompt").send_keys(PROMPT)
            driver.find_element(By.ID, "generate").click()
            wait.until(lambda d: d.find_element(By.ID, "response").get_attribute("data-weights"))
            driver.save_screenshot(args.output)
            print(f"wrote {args.output}: {driver.find_element(By.ID, 'response').text!r}")
        finally:
            driver.quit()
            server.shutdown()


if __name__ == "__main__":
    main()
