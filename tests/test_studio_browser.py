"""The studio in a real headless Chromium (Selenium): every page opened, sliders moved with the
keyboard, the descent stepped, a ranking submitted from two browser sessions at once; asserts on
the page and on the files written. Skips with "no browser" where Chromium or its driver is missing
(.ci/run installs Debian's chromium and chromium-driver)."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from studio_fixtures import PROMPTS, studio_runs  # noqa: F401  (a fixture)

webdriver = pytest.importorskip("selenium.webdriver", reason="no browser: selenium is not installed")
from selenium.common.exceptions import WebDriverException  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from lmlab.checkpoint import load_model  # noqa: E402
from lmlab.metrics import append_metrics, read_metrics  # noqa: E402
from lmlab.rankings import load_rankings  # noqa: E402
from lmlab.studio import create_app  # noqa: E402
from lmlab.studio.app import running  # noqa: E402

WAIT_S = 30


def _browser_paths():
    browser = next((p for p in map(shutil.which, ("chromium", "chromium-browser", "google-chrome")) if p), None)
    driver = shutil.which("chromedriver")
    return browser, driver


def new_browser():
    """A headless Chromium with the system's chromedriver (never one fetched at run time)."""
    from selenium.webdriver.chrome.service import Service

    browser, driver = _browser_paths()
    if not browser or not driver:
        pytest.skip("no browser: chromium and chromedriver are not installed "
                    "(apt-get install chromium chromium-driver)")
    options = webdriver.ChromeOptions()
    options.binary_location = browser
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1000", "--force-device-scale-factor=1"):
        options.add_argument(arg)
    try:
        return webdriver.Chrome(options=options, service=Service(driver))
    except WebDriverException as exc:
        pytest.skip(f"no browser: chromium did not start ({str(exc).splitlines()[0]})")


@pytest.fixture(scope="module")
def served(studio_runs, tmp_path_factory):  # noqa: F811
    """A real studio over a copy of the base run (the Training test appends to it), the instruct
    run and the base run again, and a slot the Training page may train into; rankings go to its
    own directory."""
    root = tmp_path_factory.mktemp("browser")
    growing = root / "growing"
    shutil.copytree(studio_runs[0], growing)
    app = create_app([growing, studio_runs[1], studio_runs[0]], rankings=root / "rankings.jsonl",
                     prompts=PROMPTS, stream_lifetime=20, train_into=[root / "from-page"])
    with running(app) as url:
        yield url, root


@pytest.fixture(scope="module")
def browser():
    driver = new_browser()
    yield driver
    driver.quit()


def wait_for(driver, condition, what):
    return WebDriverWait(driver, WAIT_S).until(lambda d: condition(d), message=f"waiting for {what}")


def text_of(driver, css):
    return driver.find_element(By.CSS_SELECTOR, css).text


def no_error(driver):
    assert text_of(driver, ".error") == ""


def move_slider(driver, element_id, home_then_right: int):
    """Focus a range input and move it with the keyboard as a person would: Home, then Right n times."""
    slider = driver.find_element(By.ID, element_id)
    ActionChains(driver).move_to_element(slider).click().perform()
    slider.send_keys(Keys.HOME + Keys.ARROW_RIGHT * home_then_right)


def test_descent_page_moves_the_learning_rate_and_steps_down_the_parabola(browser, served):
    url, _ = served
    browser.get(f"{url}/descent")
    wait_for(browser, lambda d: text_of(d, "#x") == "4.0000", "the path from x0 = 4")
    move_slider(browser, "lr", 59)  # min 0.005, step 0.005: lr 0.300
    wait_for(browser, lambda d: text_of(d, "#lr-out") == "0.300", "lr 0.300")
    wait_for(browser, lambda d: text_of(d, "#k") == "0", "the new path")
    for k in range(1, 4):  # one step a click, each shown before the next (a loaded machine is slow)
        browser.find_element(By.ID, "step").click()
        wait_for(browser, lambda d, k=k: text_of(d, "#k") == str(k), f"step {k}")
    # x_k = 4 (1 - 2 lr)^k on x^2
    assert text_of(browser, "#x") == f"{4 * 0.4 ** 3:.4f}"
    assert text_of(browser, "#slope") == f"{2 * 4 * 0.4 ** 3:.4f}"
    rows = [[td.text for td in tr.find_elements(By.TAG_NAME, "td")]
            for tr in browser.find_elements(By.CSS_SELECTOR, "#table tbody tr")]
    assert [r[0] for r in rows] == ["0", "1", "2", "3"]
    # each row's step taken is the one from its x: -lr * its slope (none yet from the current x)
    for _, x, slope, taken, _ in rows[:-1]:
        assert float(slope) == pytest.approx(2 * float(x), abs=1e-3)
        assert float(taken) == pytest.approx(-0.3 * float(slope), abs=1e-3)
    assert rows[-1][3] == ""
    Select(browser.find_element(By.ID, "method")).select_by_value("adam")
    wait_for(browser, lambda d: text_of(d, "#k") == "0", "the Adam path")
    browser.find_element(By.ID, "step").click()
    assert float(text_of(browser, "#x")) == pytest.approx(4 - 0.3, abs=1e-3)  # Adam's first step is lr
    no_error(browser)


def test_next_token_page_reshapes_with_top_k_and_appends_the_most_likely(browser, served, studio_runs):  # noqa: F811
    from lmlab.sample import next_token_distribution

    url, _ = served
    model, tok, _ = load_model(studio_runs[0])
    V = tok.vocab_size
    browser.get(f"{url}/next")
    wait_for(browser, lambda d: text_of(d, "#kept") == f"keeps {V} of {V} tokens", "the distribution")
    move_slider(browser, "top_k", 3)
    wait_for(browser, lambda d: text_of(d, "#kept") == f"keeps 3 of {V} tokens", "top-k 3")
    shaped = [float(e.get_attribute("data-p")) for e in browser.find_elements(By.CSS_SELECTOR, ".shaped-p")]
    assert sum(p > 0 for p in shaped) == 3 and sum(shaped) == pytest.approx(1.0, abs=1e-6)
    prompt = browser.find_element(By.ID, "prompt").get_attribute("value")
    best = tok.decode([int(np.argmax(next_token_distribution(model, tok.encode(prompt))))])
    browser.find_element(By.ID, "greedy").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "prompt").get_attribute("value") == prompt + best,
             "the most likely token appended")
    assert browser.find_element(By.CSS_SELECTOR, "#text .added").get_attribute("textContent") == best
    browser.find_element(By.ID, "sample").click()
    wait_for(browser, lambda d: d.find_element(By.ID, "seed").get_attribute("value") == "1", "a seeded sample")
    assert "with seed 0" in text_of(browser, "#picked")
    no_error(browser)


def test_loss_page_colours_each_token_and_explains_it_on_hover(browser, served, studio_runs):  # noqa: F811
    url, _ = served
    _, tok, _ = load_model(studio_runs[0])
    browser.get(f"{url}/loss")
    wait_for(browser, lambda d: d.find_elements(By.CSS_SELECTOR, "#scored span"), "the scored text")
    text = browser.find_element(By.ID, "text").get_attribute("value")
    spans = browser.find_elements(By.CSS_SELECTOR, "#scored span")
    assert len(spans) == len(tok.encode(text))
    assert "".join(s.get_attribute("textContent") for s in spans) == text
    assert "rgb(" in spans[1].get_attribute("style")
    ActionChains(browser).move_to_element(spans[2]).perform()
    wait_for(browser, lambda d: "p(right token)" in text_of(d, "#hover"), "the hover numbers")
    assert "mean" in text_of(browser, "#summary")


def test_training_page_follows_a_growing_run_live(browser, served):
    url, root = served
    last = read_metrics(root / "growing")[-1]["step"]
    browser.get(f"{url}/training")
    wait_for(browser, lambda d: text_of(d, "#panel-a .step") == str(last), "the run's last step")
    wait_for(browser, lambda d: text_of(d, "#panel-a .sample") != "", "a sample from the checkpoint")
    append_metrics(root / "growing", {"step": 999, "loss": 0.5, "val_loss": 0.75, "tokens_per_s": 12345.0})
    wait_for(browser, lambda d: text_of(d, "#panel-a .step") == "999", "the appended row")
    assert text_of(browser, "#panel-a .tps") in ("12,345", "12345")
    assert text_of(browser, "#panel-a .val") == "0.750"
    assert text_of(browser, "#panel-b .step") != ""  # the second run, side by side


def canvas_pixels(driver, css, rgb, tol=30):
    """How many pixels of a canvas are near the colour rgb."""
    return driver.execute_script(
        "const c = document.querySelector(arguments[0]), d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data, [r, g, b] = arguments[1]; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - r) < arguments[2] &&"
        " Math.abs(d[i + 1] - g) < arguments[2] && Math.abs(d[i + 2] - b) < arguments[2]) n++; return n;",
        css, list(rgb), tol)


def test_training_page_draws_losses_below_zero(browser, tmp_path):
    # rlhf logs loss = -(reward - kl_coef * KL): mostly below 0; the axis stopped at 0, so the
    # curves were clipped away and the chart was empty
    run = tmp_path / "rl"
    for step in range(1, 21):
        row = {"step": step, "loss": -0.2 - 0.03 * step, "tokens_per_s": 100.0}
        if step % 5 == 0:
            row["val_loss"] = -0.25 - 0.03 * step
        append_metrics(run, row)
    with running(create_app([run], rankings=tmp_path / "rankings.jsonl", stream_lifetime=20)) as url:
        browser.get(f"{url}/training")
        wait_for(browser, lambda d: text_of(d, "#panel-a .step") == "20", "the run's rows")
        assert text_of(browser, "#panel-a .loss") == "-0.800"
        assert canvas_pixels(browser, "#panel-a .curve", (47, 111, 223)) > 50  # train (blue)
        assert canvas_pixels(browser, "#panel-a .curve", (224, 138, 30)) > 20  # validation (orange)


def test_training_page_starts_a_pretrain_and_draws_its_curve(browser, served):
    url, root = served
    browser.get(f"{url}/training")
    wait_for(browser, lambda d: d.find_element(By.ID, "train").is_displayed(), "the training form")
    assert [o.text for o in Select(browser.find_element(By.ID, "train-run")).options] == ["from-page (new)"]
    Select(browser.find_element(By.ID, "train-stage")).select_by_value("pretrain")
    Select(browser.find_element(By.ID, "train-corpus")).select_by_value("shakespeare")
    Select(browser.find_element(By.ID, "train-preset")).select_by_value("tiny")
    steps = browser.find_element(By.ID, "train-steps")
    steps.clear()
    steps.send_keys("15")
    browser.find_element(By.ID, "train-start").click()
    wait_for(browser, lambda d: text_of(d, "#train-state") == "finished (exit 0)", "the run to finish")
    assert Select(browser.find_element(By.CSS_SELECTOR, "#panel-a .run")).first_selected_option.text == "from-page"
    wait_for(browser, lambda d: text_of(d, "#panel-a .step") == "15", "the last step on the panel")
    assert [r["step"] for r in read_metrics(root / "from-page") if "loss" in r] == list(range(1, 16))
    # the train curve is drawn: pixels of its colour (#2f6fdf) on the canvas
    blue = browser.execute_script(
        "const c = document.querySelector('#panel-a .curve'), d = c.getContext('2d')"
        ".getImageData(0, 0, c.width, c.height).data; let n = 0;"
        "for (let i = 0; i < d.length; i += 4) if (Math.abs(d[i] - 47) < 30 && Math.abs(d[i + 1] - 111) < 30"
        " && Math.abs(d[i + 2] - 223) < 30) n++; return n;")
    assert blue > 50
    assert "finished: 15 steps" in text_of(browser, "#train-log")
    assert browser.find_element(By.ID, "train-stop").get_attribute("disabled") is not None
    no_error(browser)


def test_rank_page_takes_submissions_from_two_sessions_at_once(browser, served):
    url, root = served
    other = new_browser()
    try:
        sessions = [browser, other]
        for d in sessions:
            d.get(f"{url}/rank")
            wait_for(d, lambda d: d.find_element(By.ID, "prompt").get_attribute("value") == PROMPTS[0],
                     "the prompts")
            k = d.find_element(By.ID, "k")
            k.clear()
            k.send_keys("3")
            d.find_element(By.ID, "round").click()
            wait_for(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "select.place")) == 3, "3 answers")
        places = {"Ada": ["3", "2", "1"], "Grace": ["1", "1", "2"]}
        for d, (name, chosen) in zip(sessions, places.items()):
            for select, value in zip(d.find_elements(By.CSS_SELECTOR, "select.place"), chosen):
                Select(select).select_by_value(value)
            d.find_element(By.ID, "name").send_keys(name)
        for d in sessions:  # both requests in flight together
            d.find_element(By.ID, "submit").click()
        for d, name in zip(sessions, places):
            wait_for(d, lambda d: text_of(d, "#status").startswith(f"saved: {name}"), f"{name}'s ranking saved")
        lines = (root / "rankings.jsonl").read_text(encoding="utf-8").splitlines()
        records = {r["judge"]: r for r in map(json.loads, lines)}
        assert len(lines) == 2 and set(records) == {"Ada", "Grace"}
        assert records["Ada"]["ranking"] == [2, 1, 0] and records["Grace"]["ranking"] == [[0, 1], 2]
        assert records["Ada"]["completions"] == records["Grace"]["completions"]
        shown = [e.get_attribute("textContent")
                 for e in browser.find_elements(By.CSS_SELECTOR, "#answers .mono")]
        assert shown == [PROMPTS[0] + c + ("" if e else CUT) for c, e in
                         zip(records["Ada"]["completions"], records["Ada"]["ended"])]
        assert len(load_rankings(root / "rankings.jsonl")) == 2
    finally:
        other.quit()


CUT = "\u2026 (cut at 32 tokens)"  # after an answer cut at the page's limit, as `lmlab rank` marks it


def test_rank_page_marks_the_answers_cut_at_the_token_limit(browser, served, studio_runs):  # noqa: F811
    """An answer that did not end within the round's 32 tokens is marked as cut after its text,
    an answer that ended is not; a round without "ended" (an older server) marks none."""
    from lmlab.sequences import prompt_ids_for, sample_answers

    url, _ = served
    model, tok, _ = load_model(studio_runs[0])  # the page's first run is a copy of it
    pids = prompt_ids_for(tok, PROMPTS[0], model.config.block_size, 32)
    rounds = ((s, *sample_answers(model, tok, pids, 32, [s, s + 1, s + 2])) for s in range(0, 90, 3))
    seed, texts, ended = next(r for r in rounds if len(set(r[2])) == 2)  # some ended, some cut
    browser.get(f"{url}/rank")
    wait_for(browser, lambda d: d.find_element(By.ID, "prompt").get_attribute("value") == PROMPTS[0],
             "the prompts")
    for field, value in (("k", "3"), ("seed", str(seed))):
        browser.find_element(By.ID, field).clear()
        browser.find_element(By.ID, field).send_keys(value)
    browser.find_element(By.ID, "round").click()
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "select.place")) == 3, "3 answers")
    for li, text, end in zip(browser.find_elements(By.CSS_SELECTOR, "#answers li"), texts, ended):
        assert li.find_element(By.CSS_SELECTOR, ".mono b").get_attribute("textContent") == text
        marks = [m.get_attribute("textContent") for m in li.find_elements(By.CSS_SELECTOR, ".cut")]
        assert marks == ([] if end else [CUT])
    no_error(browser)
    older = browser.execute_script(
        "return [cutMark({completions: ['a', 'b']}, 0), cutMark({completions: ['a'], ended: [false]}, 0)];")
    assert older[0] == "" and "\u2026 (cut at the token limit)" in older[1]


def test_chat_page_answers_like_lmlab_chat(browser, served, studio_runs):  # noqa: F811
    from lmlab.instruct import respond

    url, _ = served
    model, tok, _ = load_model(studio_runs[1])
    browser.get(f"{url}/chat")
    wait_for(browser, lambda d: Select(d.find_element(By.ID, "run")).options, "the chat runs")
    assert [o.text for o in Select(browser.find_element(By.ID, "run")).options] == ["chat (instruct)"]
    browser.find_element(By.ID, "message").send_keys("What is abs?" + Keys.ENTER)
    wait_for(browser, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#log div")) == 2, "the reply")
    reply, _, stop = respond(model, tok, [{"role": "user", "content": "What is abs?"}], max_new_tokens=120)
    shown = browser.find_elements(By.CSS_SELECTOR, "#log .model")[0].get_attribute("textContent")
    assert shown == "model> " + reply + ("" if stop else " [...]")  # [...]: cut at the limit
    no_error(browser)


def test_embeddings_page_shows_neighbours_of_a_clicked_token(browser, served, studio_runs):  # noqa: F811
    url, _ = served
    model, tok, _ = load_model(studio_runs[0])
    browser.get(f"{url}/embeddings")
    wait_for(browser, lambda d: "tokens" in text_of(d, "#variance"), "the map")
    i = int(tok.encode("e")[0])
    x, y, w, h = browser.execute_script(
        "const t = map.tokens[arguments[0]]; const c = document.getElementById('map');"
        "return [plot.X(t.x), plot.Y(t.y), c.clientWidth, c.clientHeight];", i)
    canvas = browser.find_element(By.ID, "map")
    ActionChains(browser).move_to_element_with_offset(canvas, int(x - w / 2), int(y - h / 2)).click().perform()
    wait_for(browser, lambda d: text_of(d, "#query").startswith("nearest to"), "the neighbours")
    wte = np.array(model.named_parameters()["wte"][: tok.vocab_size], np.float64)
    clicked = browser.execute_script("return chosen;")
    cos = wte @ wte[clicked] / (np.linalg.norm(wte, axis=1) * np.linalg.norm(wte[clicked]))
    cos[clicked] = -np.inf
    want = [tok.decode([int(j)]) for j in np.argsort(-cos, kind="stable")[:10]]
    rows = browser.find_elements(By.CSS_SELECTOR, "#neighbours tbody tr td.mono")
    label = {" ": "\u2423", "\n": "\u21b5"}
    assert [r.text for r in rows] == ["".join(label.get(c, c) for c in t) for t in want]
    no_error(browser)
