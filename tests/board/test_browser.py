"""kubetune board in a real browser (Debian's headless chromium through Selenium), local mode:
`kubetune board --mode local --saves DIR` runs as a real process; the test fills the New-run form
from the LoRA SFT preset, sees a bad value rejected next to its field with `kubetune validate`'s
own message, fixes it, starts the run, watches the progress bar and the loss curve move on the run
page until it has succeeded, then asks the result who it is in the chat panel and reads the
identity answer as it streams. The model is the tests' tiny Llama (nothing is downloaded).

Screenshots of the three pages go to $KUBETUNE_BOARD_SCREENSHOTS when set (docs/board), else tmp.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.board.browser import Board, chrome, console_errors, screenshot, screenshot_dir, wait
from tests.conftest import IDENTITY, write_alpaca

ANSWER = IDENTITY[0][1]  # "I am Kubi, a model tuned by the kubetune team."
QUESTIONS = ["Who are you?", "What is your name?", "Introduce yourself.", "Who made you?"]
# A LoRA adapter on the random 64-wide tiny model learns this one answer in 40 steps (3 s on a quiet
# machine, a minute on two busy cores); every step is logged so that the curve grows while the
# test watches, and the board's fixture paces the steps (tests/board/pacing).
TRAINING = {"learningRate": "1e-2", "maxSteps": "40", "gradientAccumulation": "1", "cutoffLen": "64",
            "loggingSteps": "1"}
RANK = "spec.stages[0].lora.rank"


def field(driver, path: str):
    """The control of a form field, found by the data-field its row carries."""
    from selenium.webdriver.common.by import By

    row = driver.find_element(By.CSS_SELECTOR, f'.field[data-field="{path}"]')
    return row, row.find_element(By.CSS_SELECTOR, "input, select, textarea")


def type_into(driver, path: str, text: str) -> None:
    """Select what the field holds and type `text` over it, as a user does (input events fire)."""
    from selenium.webdriver.common.keys import Keys

    _, control = field(driver, path)
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", control)
    control.click()
    control.send_keys(Keys.CONTROL, "a")
    control.send_keys(Keys.DELETE)
    control.send_keys(text)


def choose(driver, path: str, visible: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(field(driver, path)[1]).select_by_visible_text(visible)


def field_error(driver, path: str) -> str:
    from selenium.webdriver.common.by import By

    row, _ = field(driver, path)
    box = row.find_element(By.CSS_SELECTOR, ".field-error")
    return box.text if box.is_displayed() else ""


def validation(driver) -> dict:
    """The side panel's verdict once the last requested validation has answered."""
    return driver.execute_script("""
        const st = document.getElementById('validation-status');
        return {ok: st.dataset.ok, text: st.textContent, start: !document.getElementById('start').disabled,
                yaml: document.getElementById('yaml').textContent};""")


def validate_cli(tmp_path: Path, text: str) -> subprocess.CompletedProcess:
    f = tmp_path / "from-the-form.yaml"
    f.write_text(text)
    return subprocess.run([sys.executable, "-m", "kubetune.runtime", "validate", str(f)], capture_output=True,
                          text=True, timeout=120)


PACING = Path(__file__).resolve().parent / "pacing"  # sitecustomize.py: a sleep before each training step


@pytest.fixture
def board(tmp_path):
    saves = tmp_path / "saves"
    # The run it starts inherits this environment: 0.3 s more a step (12 s over 40 steps), so that the
    # progress moves visibly even where the tiny model trains its 40 steps in 3 s (a quiet machine).
    paths = [str(PACING), *filter(None, [os.environ.get("PYTHONPATH")])]
    b = Board(["--mode", "local", "--saves", str(saves)], tmp_path,
              env={"PYTHONPATH": os.pathsep.join(paths), "KUBETUNE_TEST_STEP_DELAY": "0.3"})
    yield b
    b.stop()


@pytest.fixture
def driver():
    d = chrome()
    yield d
    d.quit()


@pytest.mark.timeout(600)
def test_new_run_validate_start_watch_and_chat(board, driver, tiny_model, tmp_path):
    from selenium.webdriver.common.by import By

    shots = screenshot_dir(tmp_path)
    saves = tmp_path / "saves"  # the board's --saves (the fixture's)
    data = write_alpaca(tmp_path / "data" / "identity.json", pairs=[(q, ANSWER) for q in QUESTIONS])

    # ---- New run: the LoRA SFT preset, pointed at the tiny model and the identity data
    driver.get(board.url + "/new")
    wait("the form", lambda: driver.execute_script("return document.body.dataset.ready") == "true", 30,
         on_timeout=lambda: "\n".join(console_errors(driver)))
    driver.find_element(By.CSS_SELECTOR, '[data-preset="lora-sft"]').click()
    wait("the preset in the form", lambda: field(driver, "spec.stages[0].method")[1].get_attribute("value") == '"lora"', 10)
    # help text is the field's description; LLaMA-Factory's name stands beside ours
    row, _ = field(driver, RANK)
    assert "LoRA rank" in row.find_element(By.CSS_SELECTOR, ".help").text
    assert row.find_element(By.CSS_SELECTOR, ".lf").text == "LLaMA-Factory: lora_rank"
    type_into(driver, "metadata.name", "identity")
    type_into(driver, "spec.model.name", str(tiny_model))
    type_into(driver, "spec.data[0].source", str(data))
    for key, value in TRAINING.items():
        type_into(driver, f"spec.stages[0].hyperparameters.{key}", value)
    choose(driver, "spec.stages[0].hyperparameters.lrScheduler", "constant")
    choose(driver, "spec.stages[0].hyperparameters.gradientCheckpointing", "false")

    # ---- stages are a list: add one (it appears with its own fields, and in the YAML), remove it
    driver.find_element(By.CSS_SELECTOR, '[data-add="spec.stages"]').click()
    wait("a second stage", lambda: field(driver, "spec.stages[1].name")[1].get_attribute("value") == "stage2", 10)
    wait("two stages in the YAML", lambda: len(yaml.safe_load(validation(driver)["yaml"] or "{}")
                                              .get("spec", {}).get("stages", [])) == 2, 30)
    driver.find_element(By.CSS_SELECTOR, '[data-remove="spec.stages[1]"]').click()
    wait("one stage again", lambda: not driver.find_elements(By.CSS_SELECTOR, '[data-field="spec.stages[1]"]')
         and len(yaml.safe_load(validation(driver)["yaml"] or "{}").get("spec", {}).get("stages", [])) == 1, 30)

    # ---- a bad value: the error appears next to that field, with kubetune validate's message
    type_into(driver, RANK, "0")
    message = wait("the rank's error next to its field", lambda: field_error(driver, RANK), 30)
    state = wait("the verdict", lambda: (v := validation(driver))["ok"] == "false" and v, 10)
    assert not state["start"], "Start must stay disabled while the job is invalid"
    assert yaml.safe_load(state["yaml"])["spec"]["stages"][0]["lora"]["rank"] == 0
    cli = validate_cli(tmp_path, state["yaml"])
    assert cli.returncode == 42, cli.stdout + cli.stderr
    # one problem: "error: FILE: invalid FineTuneJob: FIELD: MESSAGE"; several: "  - FIELD: MESSAGE" each
    assert any(line.endswith(f" {RANK}: {message}") for line in cli.stderr.splitlines()), (message, cli.stderr)
    assert "greater than or equal to 1" in message
    driver.execute_script("arguments[0].scrollIntoView({block: 'center'})", field(driver, RANK)[0])
    assert console_errors(driver) == []
    screenshot(driver, shots, "new", full=False)  # the viewport: the field with its error, the side panel

    # ---- fixed: the error goes, the job is valid, the form's YAML passes kubetune validate
    type_into(driver, RANK, "16")
    wait("the rank's error gone and Start enabled", lambda: not field_error(driver, RANK) and validation(driver)["start"], 30)
    job = yaml.safe_load(validation(driver)["yaml"])
    assert job["spec"]["stages"][0]["lora"]["rank"] == 16
    assert job["spec"]["stages"][0]["hyperparameters"]["maxSteps"] == 40
    assert job["spec"]["model"]["name"] == str(tiny_model)
    assert validate_cli(tmp_path, validation(driver)["yaml"]).returncode == 0
    # the plan and the memory estimate (kubetune estimate's) follow the batch size
    assert driver.find_element(By.CSS_SELECTOR, '#plan [data-plan-stage="sft"]').text == "sft"

    def estimate_bytes():
        row = driver.find_element(By.CSS_SELECTOR, '#estimate-table tr[data-stage="sft"]')
        return validation(driver)["start"] and float(row.get_attribute("data-bytes"))

    small = wait("the estimate", estimate_bytes, 30)
    type_into(driver, "spec.stages[0].hyperparameters.batchSize", "64")
    big = wait("the estimate for batch 64", lambda: (b := estimate_bytes()) and b != small and b, 30)
    assert big > small, (small, big)
    type_into(driver, "spec.stages[0].hyperparameters.batchSize", "4")
    wait("the estimate for batch 4 again", lambda: estimate_bytes() == small, 30)
    driver.execute_script("window.scrollTo(0, 0)")
    screenshot(driver, shots, "new-valid", full=False)  # presets, the valid verdict, plan and estimate

    # ---- Start: to the run page
    driver.find_element(By.ID, "start").click()
    wait("the run page", lambda: driver.current_url == board.url + "/runs/identity", 30,
         on_timeout=lambda: driver.find_element(By.ID, "error").text + "\n" + board.tail())

    # ---- the progress bar and the loss curve move while it trains, until it has succeeded
    percents, points = set(), set()

    def watch():
        bar = driver.find_element(By.ID, "progress-bar").get_attribute("data-percent")
        if bar:
            percents.add(float(bar))
        points.add(int(driver.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0))
        return driver.execute_script("return document.body.dataset.phase") in ("Succeeded", "Failed")

    def run_state():
        return (f"percents {sorted(percents)} points {sorted(points)}\n"
                + driver.find_element(By.ID, "log").text[-3000:] + "\n" + board.tail())

    wait("the run to finish", watch, 420, interval=0.5, on_timeout=run_state)
    assert driver.execute_script("return document.body.dataset.phase") == "Succeeded", run_state()
    wait("the final curve", lambda: watch() and int(driver.find_element(By.ID, "loss-chart").get_attribute("data-points")) >= 40,
         15, on_timeout=run_state)
    assert len([p for p in percents if 0 < p < 100]) >= 2, run_state()  # the bar moved while it ran
    assert len([n for n in points if 0 < n < 40]) >= 2, run_state()  # and the curve grew point by point
    assert driver.find_element(By.ID, "progress-bar").get_attribute("data-percent") == "100"
    assert not driver.find_element(By.ID, "grafana").is_displayed()  # no --grafana-url, no link
    stage = driver.find_element(By.CSS_SELECTOR, '#timeline .step[data-stage="sft"]')
    assert stage.get_attribute("data-phase") == "Succeeded"
    assert driver.find_element(By.CSS_SELECTOR, '#locations [data-loc="output"]').text.endswith("sft/output")

    # ---- chat with the result: the identity answer, streamed token by token
    wait("the chat panel", lambda: driver.find_element(By.ID, "chat-panel").is_displayed(), 30)
    box = driver.find_element(By.ID, "chat-input")
    box.send_keys("Who are you?")
    driver.find_element(By.ID, "chat-send").click()
    answer = wait("the answer", lambda: (a := driver.find_elements(By.CSS_SELECTOR, ".chat-msg.assistant"))
                  and a[-1].get_attribute("data-state") in ("done", "error") and a[-1], 180, on_timeout=board.tail)
    assert answer.get_attribute("data-state") == "done", answer.text + "\n" + board.tail()
    assert answer.text == ANSWER, answer.text
    assert int(answer.get_attribute("data-tokens")) >= 3  # it came in pieces, not as one block
    assert console_errors(driver) == []
    # every resource the page loaded came from the board itself (no CDN, no web fonts)
    loaded = driver.execute_script("return performance.getEntriesByType('resource').map((r) => r.name)")
    assert loaded and all(u.startswith(board.url + "/") for u in loaded), loaded
    screenshot(driver, shots, "run")

    # ---- the Runs page lists it
    driver.get(board.url + "/")
    row = wait("the run in the list", lambda: driver.find_element(By.CSS_SELECTOR, 'tr[data-run="identity"]'), 20)
    assert row.find_element(By.CSS_SELECTOR, '[data-col="phase"]').text == "Succeeded"
    assert row.find_element(By.CSS_SELECTOR, ".progress").get_attribute("data-percent") == "100"
    time.sleep(0.5)
    screenshot(driver, shots, "runs")
    assert console_errors(driver) == []

    # ---- Delete asks first: dismissed, nothing happens; accepted, the run and its folder go
    row.find_element(By.CSS_SELECTOR, '[data-col="name"] a').click()
    wait("the run page", lambda: driver.execute_script("return document.body.dataset.phase") == "Succeeded", 20)
    driver.find_element(By.ID, "delete").click()
    alert = driver.switch_to.alert
    assert "Delete run identity?" in alert.text
    alert.dismiss()
    time.sleep(1)
    assert driver.current_url == board.url + "/runs/identity" and (saves / "identity").is_dir()
    driver.find_element(By.ID, "delete").click()
    driver.switch_to.alert.accept()
    wait("the Runs page without the run", lambda: driver.current_url == board.url + "/"
         and driver.find_element(By.ID, "no-runs").is_displayed(), 30, on_timeout=board.tail)
    assert not (saves / "identity").exists()
    assert [r["name"] for r in board.api("/api/runs")["items"]] == []
