"""Drive the admin console in headless Chromium (Selenium WebDriver, Debian's chromium-driver).

Run by crates/seaport-sea/tests/admin_console.rs, which prepares a service with one dead letter
and checks the JSON this prints on its last line. Steps: the dead letter is listed (its hostile
error text shown as text, not markup); replay without the token and with a wrong one is refused
(403) and replays nothing; with the token it redirects back and the dead letter turns
`processed`; the trace lookup draws the event with its consumers and its consequence. Full-page
screenshots of the overview and the trace are saved.

usage: admin_console.py BASE TOKEN DEAD_LETTER_ID CORRELATION_ID EVENT_ID SCREENSHOT_PNG
"""

import base64
import json
import os
import sys
import time

from selenium import webdriver
from selenium.common.exceptions import WebDriverException
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By

CHROMIUM = os.environ.get("SEAPORT_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = os.environ.get("SEAPORT_CHROMEDRIVER", "/usr/bin/chromedriver")


class Failed(Exception):
    pass


def check(cond, what):
    if not cond:
        raise Failed(what)


def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in (
        "--headless=new",
        "--no-sandbox",  # the test may run as root (CI)
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1400,1000",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
    ):
        options.add_argument(arg)
    # An explicit driver path: Selenium Manager (which downloads drivers) is never needed.
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def full_page_screenshot(driver, path):
    """The whole page, not just the viewport (Chromium's DevTools protocol)."""
    metrics = driver.execute_cdp_cmd("Page.getLayoutMetrics", {})
    size = metrics.get("cssContentSize") or metrics["contentSize"]
    shot = driver.execute_cdp_cmd(
        "Page.captureScreenshot",
        {
            "format": "png",
            "captureBeyondViewport": True,
            "clip": {"x": 0, "y": 0, "width": size["width"], "height": size["height"], "scale": 1},
        },
    )
    with open(path, "wb") as f:
        f.write(base64.b64decode(shot["data"]))


def row(driver, dead_letter_id):
    return driver.find_element(By.ID, f"dead-letter-{dead_letter_id}")


def submit_replay(driver, dead_letter_id, token):
    form = row(driver, dead_letter_id).find_element(By.CSS_SELECTOR, "form.replay")
    field = form.find_element(By.NAME, "token")
    field.clear()
    if token:
        field.send_keys(token)
    form.find_element(By.CSS_SELECTOR, "button.replay").click()


def wait_for(driver, what, cond, timeout=30.0):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
            if value:
                return value
        except WebDriverException:
            pass
        if time.monotonic() > deadline:
            raise Failed(f"timed out waiting for {what} (at {driver.current_url})")
        time.sleep(0.2)


def refused_status(driver):
    """The status the refusal page reports (the browser does not expose the HTTP status)."""
    refused = wait_for(driver, "the refusal page", lambda: driver.find_elements(By.ID, "refused"))
    return int(refused[0].get_attribute("data-status")), refused[0].text


def main():
    base, token, dl_id, correlation_id, event_id, screenshot = sys.argv[1:7]
    result = {}
    driver = browser()
    try:
        # 1. The dead letter is listed, its attacker-controlled error shown as text.
        driver.get(base + "/admin")
        r = wait_for(driver, "the dead letter row", lambda: row(driver, dl_id))
        result["state_before"] = r.get_attribute("data-state")
        result["error_text"] = r.find_element(By.CSS_SELECTOR, "td.error").text
        result["consumer"] = r.find_element(By.CSS_SELECTOR, "td.consumer").text
        result["xss_elements"] = len(driver.find_elements(By.ID, "xss"))
        result["csp_meta"] = driver.find_element(
            By.CSS_SELECTOR, "meta[http-equiv='Content-Security-Policy']"
        ).get_attribute("content")
        check(result["state_before"] == "dead", f"the dead letter is not 'dead': {result}")

        # 2. Replay without the token, then with a wrong one: refused, nothing replayed.
        submit_replay(driver, dl_id, "")
        result["without_token"], result["without_token_text"] = refused_status(driver)
        driver.get(base + "/admin")
        submit_replay(driver, dl_id, "not-the-admin-token-at-all")
        result["wrong_token"], result["wrong_token_text"] = refused_status(driver)
        driver.get(base + "/admin")
        r = wait_for(driver, "the dead letter row", lambda: row(driver, dl_id))
        result["replays_after_refusals"] = int(r.get_attribute("data-replays"))
        result["state_after_refusals"] = r.get_attribute("data-state")

        # 3. Replay with the token: back on the overview with a flash, then processed.
        submit_replay(driver, dl_id, token)
        wait_for(driver, "the redirect", lambda: f"replayed={dl_id}" in driver.current_url)
        result["redirected_to"] = driver.current_url
        result["flash"] = driver.find_element(By.ID, "flash").text

        def processed():
            driver.refresh()
            r = row(driver, dl_id)
            return r if r.get_attribute("data-state") == "processed" else None

        r = wait_for(driver, "the dead letter to be processed", processed)
        result["state_after_replay"] = r.get_attribute("data-state")
        result["replays_after_replay"] = int(r.get_attribute("data-replays"))
        result["state_text"] = r.find_element(By.CSS_SELECTOR, "td.state").text
        os.makedirs(os.path.dirname(screenshot), exist_ok=True)
        full_page_screenshot(driver, screenshot)
        result["screenshot"] = screenshot

        # 4. The trace lookup draws the event, who processed it, and what it caused.
        lookup = driver.find_element(By.ID, "trace-lookup")
        lookup.find_element(By.NAME, "correlation_id").send_keys(correlation_id)
        lookup.find_element(By.CSS_SELECTOR, "button").click()
        event = wait_for(driver, "the traced event", lambda: driver.find_element(By.ID, f"event-{event_id}"))
        result["trace_event_type"] = event.get_attribute("data-type")
        result["trace_processed_by"] = sorted(
            li.get_attribute("data-consumer")
            for li in event.find_elements(By.CSS_SELECTOR, ":scope > .what > ul.consumers > li.processed-by")
        )
        result["trace_children"] = [
            li.get_attribute("data-type")
            for li in event.find_elements(By.CSS_SELECTOR, ":scope > ul.children > li.event")
        ]
        result["trace_xss_elements"] = len(driver.find_elements(By.ID, "xss"))
        trace_shot = screenshot.replace(".png", "-trace.png")
        full_page_screenshot(driver, trace_shot)
        result["trace_screenshot"] = trace_shot
        result["ok"] = True
    except Failed as e:
        result["ok"] = False
        result["error"] = str(e)
    finally:
        driver.quit()
    print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
