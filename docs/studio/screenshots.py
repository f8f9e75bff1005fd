"""Draw the README's screenshots of lmlab studio: trains two small runs (a char model on the built-in
Shakespeare and its instruct-tuned child), serves them, drives each page in headless Chromium and
saves docs/studio/<page>.png.

    python docs/studio/screenshots.py [--work DIR] [--steps 600]

Needs chromium and chromedriver (apt-get install chromium chromium-driver) and lmlab[studio,test].
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.action_chains import ActionChains
from selenium.webdriver.common.by import By
from selenium.webdriver.common.keys import Keys
from selenium.webdriver.support.ui import Select, WebDriverWait

from lmlab.instruct import instruct_tune
from lmlab.pretrain import pretrain
from lmlab.studio import create_app
from lmlab.studio.app import running

HERE = Path(__file__).resolve().parent


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,860",
                "--force-device-scale-factor=1", "--hide-scrollbars"):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def until(d, condition):
    WebDriverWait(d, 300).until(lambda d: condition(d))


def text(d, css):
    return d.find_element(By.CSS_SELECTOR, css).text


def shoot(d, name):
    time.sleep(0.5)  # let the last canvas draw land
    d.save_screenshot(str(HERE / f"{name}.png"))
    print(f"wrote docs/studio/{name}.png")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default=None, help="where the runs go (default: a temporary directory)")
    ap.add_argument("--steps", type=int, default=600, help="pretraining steps")
    args = ap.parse_args()
    work = Path(args.work or tempfile.mkdtemp(prefix="lmlab-studio-"))
    base, chat = work / "base", work / "chat"
    if not base.exists():
        pretrain("builtin:shakespeare", base, n_layer=2, n_head=4, n_embd=64, block_size=64,
                 batch_size=16, steps=args.steps, lr=3e-3, warmup_steps=30, eval_every=50,
                 save_every=0, progress=False, seed=0)
    if not chat.exists():
        instruct_tune(base, None, chat, steps=150, lr=1e-3, eval_every=50, progress=False, seed=0)
    shutil.rmtree(work / "class", ignore_errors=True)  # the Training page trains it afresh
    app = create_app([base, chat], rankings=work / "rankings.jsonl",
                     prompts=["ROMEO: ", "JULIET: ", "First Citizen: "], train_into=[work / "class"])
    d = browser()
    try:
        with running(app) as url:
            d.get(f"{url}/descent")
            until(d, lambda d: text(d, "#x") != "")
            slider = d.find_element(By.ID, "lr")
            ActionChains(d).move_to_element(slider).click().perform()
            slider.send_keys(Keys.HOME + Keys.ARROW_RIGHT * 159)  # lr 0.8: overshoots, oscillates
            until(d, lambda d: text(d, "#lr-out") == "0.800")
            for _ in range(9):
                d.find_element(By.ID, "step").click()
            shoot(d, "descent")

            d.get(f"{url}/next")
            until(d, lambda d: text(d, "#kept").startswith("keeps"))
            prompt = d.find_element(By.ID, "prompt")
            prompt.clear()
            prompt.send_keys("ROMEO:\nWhat light through yonder window ")
            slider = d.find_element(By.ID, "top_k")
            ActionChains(d).move_to_element(slider).click().perform()
            slider.send_keys(Keys.HOME + Keys.ARROW_RIGHT * 8)
            until(d, lambda d: text(d, "#kept").startswith("keeps 8 "))
            for _ in range(3):
                d.find_element(By.ID, "greedy").click()
                time.sleep(1)
            shoot(d, "next")

            d.get(f"{url}/loss")
            box = d.find_element(By.ID, "text")
            box.clear()
            box.send_keys("ROMEO:\nBut soft, what light through yonder window breaks?\nIt is the east, "
                          "and Juliet is the sun.")
            d.find_element(By.ID, "score").click()
            until(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "#scored span")) > 40)
            ActionChains(d).move_to_element(d.find_elements(By.CSS_SELECTOR, "#scored span")[12]).perform()
            shoot(d, "loss")

            d.set_window_size(1280, 1120)  # the training form above the two panels
            d.get(f"{url}/training")
            until(d, lambda d: d.find_element(By.ID, "train").is_displayed())
            Select(d.find_element(By.ID, "train-preset")).select_by_value("small")
            steps = d.find_element(By.ID, "train-steps")
            steps.clear()
            steps.send_keys("400")
            d.find_element(By.ID, "train-start").click()
            Select(d.find_element(By.CSS_SELECTOR, "#panel-b .run")).select_by_value("0")  # the base beside it
            until(d, lambda d: text(d, "#panel-a .step") not in ("", "\u2013") and int(text(d, "#panel-a .step")) >= 120
                  and text(d, "#panel-b .sample") != "" and text(d, "#panel-a .sample") != "")
            shoot(d, "training")
            d.find_element(By.ID, "train-stop").click()
            until(d, lambda d: text(d, "#train-state").startswith("stopped"))
            d.set_window_size(1280, 860)

            d.get(f"{url}/rank")
            until(d, lambda d: d.find_element(By.ID, "prompt").get_attribute("value") == "ROMEO: ")
            d.find_element(By.ID, "round").click()
            until(d, lambda d: len(d.find_elements(By.CSS_SELECTOR, "select.place")) == 4)
            d.find_element(By.ID, "name").send_keys("Ada")
            d.find_element(By.ID, "submit").click()
            until(d, lambda d: text(d, "#status").startswith("saved"))
            shoot(d, "rank")

            d.get(f"{url}/chat")
            until(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#run option"))
            for message in ("What does abs do?", "What does len do?"):
                d.find_element(By.ID, "message").send_keys(message + Keys.ENTER)
                time.sleep(2)
            shoot(d, "chat")

            d.get(f"{url}/embeddings")
            until(d, lambda d: "tokens" in text(d, "#variance"))
            d.find_element(By.ID, "token").send_keys("a")
            d.find_element(By.ID, "find").click()
            until(d, lambda d: text(d, "#query").startswith("nearest"))
            shoot(d, "embeddings")
    finally:
        d.quit()


if __name__ == "__main__":
    main()
