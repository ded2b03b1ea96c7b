"""kubetune board in cluster mode, in a real browser (headless Debian chromium through Selenium),
against the real control plane: the operator runs as a process and its pods run the FAKE RUNTIME
(operatorlib), so the job's progress is real status written by the operator. The board acts with
the test cluster's kubeconfig only.

A FineTuneJob applied with `kubectl apply` appears on the Runs page without a reload, its progress
moves there, and the run page's Suspend button suspends it: spec.suspend becomes true (the board's
patch, with the user's credentials) and the operator's status says Suspended, which the page shows.
"""

from __future__ import annotations

import pytest

from operatorlib import apply, condition, ftj, quickstart, wait_status
from tests.board.browser import Board, chrome, console_errors, screenshot, screenshot_dir, wait

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(600)
def test_board_shows_an_applied_job_live_and_suspends_it(control_plane, kube, operator, namespace, store, tmp_path):
    from selenium.webdriver.common.by import By

    shots = screenshot_dir(tmp_path)
    grafana = "http://grafana.example/d/kubetune/kubetune"
    board = Board(["--mode", "cluster", "--kubeconfig", control_plane.kubeconfig, "--namespace", namespace,
                   "--grafana-url", grafana], tmp_path)
    driver = chrome()
    try:
        driver.get(board.url + "/")
        wait("the empty list", lambda: driver.find_element(By.ID, "no-runs").is_displayed(), 30,
             on_timeout=board.tail)
        where = driver.find_element(By.ID, "where")
        assert where.get_attribute("data-mode") == "cluster" and namespace in where.text
        driver.execute_script("window.__sameDocument = true")  # gone if the page reloads

        # ---- kubectl apply: the run appears, and its progress moves, without a reload
        apply(control_plane, quickstart(store, name="watched", step_s=0.5, max_steps=200, every=5), namespace)
        row = 'tr[data-run="watched"]'
        wait("the applied job on the Runs page", lambda: driver.find_elements(By.CSS_SELECTOR, row), 60,
             on_timeout=board.tail)
        percents: set[float] = set()

        def moving():
            cell = driver.find_element(By.CSS_SELECTOR, f"{row} .progress").get_attribute("data-percent")
            if cell:
                percents.add(float(cell))
            return len([p for p in percents if 0 < p < 100]) >= 2

        wait("the progress to move on the Runs page", moving, 90, interval=0.5,
             on_timeout=lambda: f"percents seen {sorted(percents)}\n{operator.tail()}\n{board.tail()}")
        assert driver.find_element(By.CSS_SELECTOR, f'{row} [data-col="phase"]').text == "Running"
        assert driver.find_element(By.CSS_SELECTOR, f'{row} [data-col="stage"]').text.startswith("sft")
        assert driver.execute_script("return window.__sameDocument") is True
        screenshot(driver, shots, "runs-cluster")

        # ---- the run page: Suspend
        driver.find_element(By.CSS_SELECTOR, f'{row} [data-col="name"] a').click()
        wait("the run page, running", lambda: driver.execute_script("return document.body.dataset.phase") == "Running", 30)
        wait("loss points on the curve", lambda: int(driver.find_element(By.ID, "loss-chart").get_attribute("data-points") or 0) >= 2,
             60, on_timeout=board.tail)
        # the Grafana link opens the kubetune dashboard on this job
        link = driver.find_element(By.ID, "grafana")
        assert link.is_displayed()
        assert link.get_attribute("href") == f"{grafana}?var-namespace={namespace}&var-job=watched"
        suspend = driver.find_element(By.ID, "suspend")
        assert suspend.is_enabled() and not driver.find_element(By.ID, "resume").is_enabled()
        suspend.click()
        done = wait_status(kube, namespace, "watched", lambda s: s.get("phase") == "Suspended", 60, "Suspended", operator)
        assert ftj(kube, namespace, "watched")["spec"]["suspend"] is True
        assert condition(done, "Suspended")["status"] == "True"
        wait("the page to show Suspended", lambda: driver.execute_script("return document.body.dataset.phase") == "Suspended",
             30, on_timeout=board.tail)
        assert driver.find_element(By.ID, "resume").is_enabled() and not driver.find_element(By.ID, "suspend").is_enabled()
        wait("the Suspended condition on the page",
             lambda: driver.find_elements(By.CSS_SELECTOR, '#conditions tr[data-condition="Suspended"][data-status="True"]'), 30)
        assert console_errors(driver) == []
        screenshot(driver, shots, "run-cluster")
    finally:
        driver.quit()
        board.stop()
