"""The playground page in a real headless browser (Debian's chromium + chromedriver, driven by Selenium).

.ci/run installs chromium and its driver when they are missing; where neither can be had the test
is skipped, saying so. The page must only ever talk to the server that served it.
"""

import json
import shutil

import pytest
from conftest import SERVE_BLOCK, SERVE_CHARS, Running, lively_model

from gpt.data.chat_template import ChatTemplate
from gpt.data.tokenizer import CharTokenizer

webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install -e '.[dev]')")
CHROMIUM, DRIVER = shutil.which("chromium") or shutil.which("chromium-browser"), shutil.which("chromedriver")
if not (CHROMIUM and DRIVER):
    pytest.skip("chromium and chromedriver are not installed (.ci/run installs them with apt)", allow_module_level=True)

from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


@pytest.fixture(scope="module")
def server():
    tok = CharTokenizer(SERVE_CHARS)
    ChatTemplate.add_tokens(tok)
    s = Running(lively_model(tok.vocab_size, block_size=SERVE_BLOCK), tok)
    yield s
    s.stop()


@pytest.fixture(scope="module")
def browser():
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,800",
                "--disable-background-networking", "--disable-component-update", "--no-first-run"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"performance": "ALL", "browser": "ALL"})
    driver = webdriver.Chrome(options=opts, service=webdriver.ChromeService(executable_path=DRIVER))
    yield driver
    driver.quit()


def set_value(driver, element_id: str, value) -> None:
    driver.execute_script("const e = document.getElementById(arguments[0]); e.value = arguments[1];"
                          "e.dispatchEvent(new Event('input')); e.dispatchEvent(new Event('change'));",
                          element_id, str(value))


def run_and_wait(driver) -> str:
    driver.execute_script("document.getElementById('status').textContent = ''")  # no stale "done"
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 30).until(lambda d: d.find_element(By.ID, "status").text.startswith(("done", "error")))
    return driver.find_element(By.ID, "status").text


def open_fresh(d, server):
    """The page with nothing stored from earlier tests, once it has read the model's name."""
    d.get(server.url + "/")
    d.execute_script("localStorage.clear()")
    d.get(server.url + "/")
    WebDriverWait(d, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
    return d


def generated(driver, root: str = "output") -> str:
    return "".join(e.get_attribute("textContent") for e in driver.find_elements(By.CSS_SELECTOR, f"#{root} .gen"))


def test_playground_complete_chat_probabilities_and_code(server, browser):
    d = open_fresh(browser, server)
    free = server.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=20)
    stop = free.choices[0].text[6:8]
    api = server.client.completions.create(model="tiny", prompt="Hello", temperature=0, max_tokens=20, top_p=1,
                                           stop=[stop]).choices[0].text

    # Complete mode: temperature 0, a stop sequence; the streamed text is the API's
    d.find_element(By.ID, "prompt").send_keys("Hello")
    set_value(d, "temperature", 0)
    set_value(d, "max_tokens", 20)
    set_value(d, "stop_seqs", stop.replace("\n", "\\n"))
    assert run_and_wait(d) == "done (stop)"
    assert generated(d) == api
    assert "prompt tokens" in d.find_element(By.ID, "count").text

    # View code: the Python it shows returns the same text with the openai client
    d.find_element(By.ID, "view-code").click()
    code = d.find_element(By.ID, "code-python").text
    assert "stream=True" in code and "curl" in d.find_element(By.ID, "code-curl").text
    scope: dict = {}
    exec(code.replace("stream=True", "stream=False"), scope)  # the page streams; one response is simpler here
    assert scope["response"].choices[0].text == api
    d.find_element(By.ID, "code-close").click()

    # Show probabilities: every generated token is shaded and has a probability; focus shows alternatives
    set_value(d, "stop_seqs", "")
    d.find_element(By.CSS_SELECTOR, "#show_probs option[value=full]").click()
    assert run_and_wait(d) == "done (length)"
    toks = d.find_elements(By.CSS_SELECTOR, "#output .tok")
    assert len(toks) == 20 and all(0 < float(t.get_attribute("data-p")) <= 1 for t in toks)
    assert generated(d) == free.choices[0].text
    d.execute_script("arguments[0].focus()", toks[0])
    panel = d.find_element(By.ID, "prob-panel")
    assert panel.is_displayed() and "%" in panel.text and len(panel.find_elements(By.TAG_NAME, "li")) == 5

    # Chat mode: a system message and a user turn; the reply is the API's greedy reply
    d.find_element(By.ID, "mode-chat").click()
    set_value(d, "show_probs", "off")
    set_value(d, "stop_seqs", "")
    d.find_element(By.ID, "system").send_keys("Be brief.")
    d.find_element(By.ID, "user-input").send_keys("hi there")
    assert run_and_wait(d).startswith("done")
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi there"}]
    reply = server.client.chat.completions.create(model="tiny", messages=msgs, temperature=0, max_tokens=20)
    assert generated(d, "turns") == reply.choices[0].message.content

    # The settings persist in local storage
    d.get(server.url + "/")
    WebDriverWait(d, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
    assert d.find_element(By.ID, "temperature").get_attribute("value") == "0"
    assert not d.find_element(By.ID, "chat-pane").get_attribute("hidden")

    # Nothing but the server was contacted
    urls = [json.loads(e["message"])["message"].get("params", {}).get("request", {}).get("url", "")
            for e in d.get_log("performance")]
    urls = [u for u in urls if u]
    assert urls and all(u.startswith(server.url) or u.startswith(("data:", "blob:", "about:")) for u in urls), urls


def test_playground_defaults_fit_the_context_and_labels_show_the_values(server, browser):
    d = open_fresh(browser, server)
    slider, label = d.find_element(By.ID, "max_tokens"), d.find_element(By.ID, "max_tokens-v")
    default = min(256, SERVE_BLOCK // 2)
    assert slider.get_attribute("value") == label.text == str(default)  # the label shows the real value at load
    assert int(slider.get_attribute("max")) < SERVE_BLOCK  # at least one prompt token fits beside it
    for sid in ("temperature", "top_p", "frequency_penalty", "presence_penalty", "best_of"):
        assert d.find_element(By.ID, sid + "-v").text == d.find_element(By.ID, sid).get_attribute("value"), sid
    set_value(d, "max_tokens", 7)
    assert label.text == "7"  # and follows the slider
    set_value(d, "max_tokens", default)

    # Submit with the defaults works on a fresh page
    d.find_element(By.ID, "prompt").send_keys("Hello")
    assert run_and_wait(d).startswith("done (")  # not refused

    # A prompt too long for prompt + maximum length: the page says so before asking the server
    set_value(d, "prompt", "ab " * SERVE_BLOCK)
    d.find_element(By.ID, "submit").click()
    WebDriverWait(d, 10).until(lambda d: "too long" in d.find_element(By.ID, "status").text)
    status = d.find_element(By.ID, "status").text
    assert f"{SERVE_BLOCK}-token context" in status and "Maximum length" in status

    # Settings saved for a larger context do not make every submit fail on this one
    d.execute_script("const s = JSON.parse(localStorage.getItem('gpt-playground')); s.max_tokens = '2000';"
                     "s.prompt = 'Hello'; localStorage.setItem('gpt-playground', JSON.stringify(s))")
    d.get(server.url + "/")
    WebDriverWait(d, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
    assert d.find_element(By.ID, "max_tokens").get_attribute("value") == str(default)
    assert d.find_element(By.ID, "max_tokens-v").text == str(default)
    assert run_and_wait(d).startswith("done (")


def test_playground_stops_storing_when_asked_and_runs_under_its_csp(server, browser):
    d = browser
    d.get(server.url + "/")
    d.execute_script("localStorage.clear()")
    d.get(server.url + "/")
    WebDriverWait(d, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
    def stored():
        return sorted(d.execute_script("return Object.keys(localStorage)"))

    set_value(d, "prompt", "Hello private")
    assert run_and_wait(d).startswith("done (")
    assert "Hello private" in d.execute_script("return localStorage.getItem('gpt-playground')")

    # Remember off: what the page stored is cleared, and nothing more is stored
    remember = d.find_element(By.ID, "remember")
    assert remember.is_selected()
    remember.click()
    assert stored() == ["gpt-playground-remember"]
    set_value(d, "prompt", "Hello secret")
    assert run_and_wait(d).startswith("done (")
    assert stored() == ["gpt-playground-remember"]
    d.get(server.url + "/")
    WebDriverWait(d, 20).until(lambda d: "tiny" in d.find_element(By.ID, "model-name").text)
    assert d.find_element(By.ID, "prompt").get_attribute("value") == ""
    assert not d.find_element(By.ID, "remember").is_selected()  # the choice itself is remembered

    # On again: the page stores from now on
    d.find_element(By.ID, "remember").click()
    assert stored() == ["gpt-playground"]

    # The page's code runs under its Content-Security-Policy: the browser blocked nothing
    blocked = [e["message"] for e in d.get_log("browser") if "Content Security Policy" in e["message"]]
    assert not blocked, blocked
