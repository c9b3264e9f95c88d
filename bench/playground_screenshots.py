"""Screenshots of the playground at 1280x800 for docs/serving.md (docs/playground-*.png), from a tiny random model.

    python bench/playground_screenshots.py

Needs chromium, chromedriver and selenium (as tests/test_playground.py). The model is random, so
the text is gibberish: the pictures show the page, not a model.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

import uvicorn  # noqa: E402
from conftest import lively_model  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

from gpt.data.chat_template import ChatTemplate  # noqa: E402
from gpt.data.tokenizer import CharTokenizer  # noqa: E402
from gpt.serve.app import ServerConfig, create_app  # noqa: E402


def main() -> None:
    tok = CharTokenizer(list("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ <>:.,!?'\n"))
    ChatTemplate.add_tokens(tok)
    app = create_app(lively_model(tok.vocab_size, block_size=256), tok, ServerConfig("tiny-demo"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.01)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    opts = webdriver.ChromeOptions()
    opts.binary_location = shutil.which("chromium") or ""
    for arg in ("--headless=new", "--no-sandbox", "--window-size=1280,800", "--hide-scrollbars"):
        opts.add_argument(arg)
    d = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=shutil.which("chromedriver")))
    try:
        d.get(url)
        WebDriverWait(d, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
        d.find_element(By.ID, "prompt").send_keys("Once upon a time")
        d.execute_script("for (const [k, v] of [['max_tokens', 60], ['temperature', 0.8], ['seed', 1]]) {"
                         "const e = document.getElementById(k); e.value = v; e.dispatchEvent(new Event('input'));}")
        d.find_element(By.CSS_SELECTOR, "#show_probs option[value=full]").click()
        d.find_element(By.ID, "submit").click()
        WebDriverWait(d, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        d.execute_script("document.querySelector('#output .tok').focus()")
        out = ROOT / "docs"
        out.mkdir(exist_ok=True)
        d.save_screenshot(str(out / "playground-complete.png"))
        d.find_element(By.ID, "mode-chat").click()
        d.find_element(By.ID, "system").send_keys("You are a terse assistant.")
        d.find_element(By.ID, "user-input").send_keys("What is a KV cache?")
        d.find_element(By.ID, "submit").click()
        WebDriverWait(d, 60).until(lambda d: d.find_element(By.ID, "status").text.startswith("done"))
        d.save_screenshot(str(out / "playground-chat.png"))
        print("wrote docs/playground-complete.png and docs/playground-chat.png")
    finally:
        d.quit()
        server.should_exit = True


if __name__ == "__main__":
    main()
