"""`indicfm data review` in a real browser: Debian's headless Chromium driven by selenium.

Needs ``apt-get install -y chromium chromium-driver`` (nothing is downloaded at test time: the
driver and browser paths are given, so selenium's own driver manager never runs) and selenium from
pip (the ``dev`` extra).  Slow (a browser start and a second `data prepare`-free cache build take
several seconds), so it is not in the default run.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from indicfm.data.config import DataConfig
from indicfm.data.features import FEATURES_FILE
from indicfm.data.prepare import prepare
from indicfm.data.review.server import EXPORT_FILE, JUDGEMENTS_FILE, make_server
from indicfm.data.testing import train_tiny_tokenizer
from test_data_review import _make_corpus, reference_verdicts

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

pytestmark = pytest.mark.slow


def _driver(tmp_path: Path):
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is not installed (pip install selenium)")
    if not (Path(CHROMIUM).is_file() and Path(CHROMEDRIVER).is_file()):
        pytest.skip("Debian's Chromium is not installed (apt-get install -y chromium chromium-driver)")
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--window-size=1500,2400", f"--user-data-dir={tmp_path / 'profile'}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _wait(predicate, timeout: float = 20.0, what: str = "the page"):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            value = predicate()
        except Exception:  # an element not there yet, or replaced while read
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def test_move_a_threshold_mark_a_document_and_export_in_chromium(tmp_path, sample_train_dir):
    driver = _driver(tmp_path)
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    corpus = tmp_path / "corpus"
    _make_corpus(sample_train_dir, corpus)
    tokenizer = train_tiny_tokenizer(sample_train_dir, tmp_path / "tiny")
    cache = tmp_path / "cache"
    prepare([corpus], tokenizer, cache, seq_len=64, workers=1, show_progress=False)
    rows = pq.read_table(cache / FEATURES_FILE).to_pylist()
    hin = [i for i, r in enumerate(rows) if r["lang"] == "hin_Deva"]
    server = make_server(cache, port=0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        driver.get(f"http://127.0.0.1:{server.server_address[1]}/")
        _wait(lambda: driver.find_element(By.CSS_SELECTOR, 'tr[data-lang="hin_Deva"]'), what="the language table")
        driver.find_element(By.CSS_SELECTOR, 'tr[data-lang="hin_Deva"]').click()
        _wait(lambda: driver.find_element(By.ID, "current-lang").text == "hin_Deva")
        kept_now = sum(rows[i]["reason"] is None for i in hin)
        _wait(lambda: driver.find_element(By.ID, "kept-then").text == f"{kept_now:,}", what="the kept count")

        # Move the min_words slider from 3 to 7 with the keyboard, as a person would.
        slider = _wait(lambda: driver.find_element(By.CSS_SELECTOR, 'input.threshold-range[data-rule="min_words"]'))
        slider.click()  # a click moves it to where it was clicked: set it back with the keys below
        slider.send_keys(Keys.HOME)
        for _ in range(7):
            slider.send_keys(Keys.ARROW_RIGHT)
        assert driver.find_element(By.CSS_SELECTOR, 'input.threshold-number[data-rule="min_words"]').get_attribute("value") == "7"
        expected = reference_verdicts(rows, DataConfig.model_validate(
            {"language_filters": {"hin_Deva": {"min_words": 7}}}))
        kept_then = sum(expected[i] is None for i in hin)
        assert kept_then < kept_now
        _wait(lambda: driver.find_element(By.ID, "kept-then").text == f"{kept_then:,}", what="the count to change")
        newly_dropped = sum(rows[i]["reason"] is None and expected[i] is not None for i in hin)
        assert driver.find_element(By.ID, "newly-dropped").text == f"{newly_dropped:,} newly dropped"
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, "#changes .doc"), what="the documents that change")
        changed_ids = [int(e.get_attribute("data-doc")) for e in driver.find_elements(By.CSS_SELECTOR, "#changes .doc")]
        assert changed_ids == [i for i in hin if expected[i] != rows[i]["reason"]][: len(changed_ids)]
        driver.save_screenshot(str(tmp_path / "review_threshold.png"))

        # Mark the first document that would change as wrongly kept (the page asks for a name once).
        driver.find_element(By.CSS_SELECTOR, "#changes .doc button.judge").click()
        alert = _wait(lambda: driver.switch_to.alert, what="the name prompt")
        alert.send_keys("browser-test")
        alert.accept()
        judgements = cache / JUDGEMENTS_FILE
        _wait(lambda: judgements.is_file() and judgements.read_text().strip(), what="the judgement file")
        saved = json.loads(judgements.read_text(encoding="utf-8").splitlines()[-1])
        assert (saved["id"], saved["label"], saved["who"]) == (changed_ids[0], "wrongly_kept", "browser-test")

        driver.find_element(By.ID, "export-button").click()
        _wait(lambda: "min_words: 7" in driver.find_element(By.ID, "export-yaml").text, what="the exported YAML")
        assert "min_words: 7" in (cache / EXPORT_FILE).read_text(encoding="utf-8")
        driver.execute_script("document.getElementById('export-yaml').scrollIntoView()")
        driver.save_screenshot(str(tmp_path / "review_export.png"))

        # Urdu: right to left.
        driver.find_element(By.CSS_SELECTOR, 'tr[data-lang="urd_Arab"]').click()
        _wait(lambda: driver.find_elements(By.CSS_SELECTOR, '#dropped .doc .text[dir="rtl"]'), what="Urdu examples")
        driver.execute_script("document.getElementById('dropped').scrollIntoView()")
        driver.save_screenshot(str(tmp_path / "review_urdu.png"))
        for name in ("review_threshold.png", "review_export.png", "review_urdu.png"):
            assert (tmp_path / name).stat().st_size > 10_000
        print(f"screenshots in {tmp_path}")
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()
        shutil.rmtree(tmp_path / "profile", ignore_errors=True)
