"""Screenshots of the MLflow UI on a workspace's runs, in headless Chromium, for docs/ui/.

    python docs/screenshots.py --home .instructflow      # needs two runs in the workspace

Needs Debian's chromium (`apt-get install chromium`) and `pip install playwright` (its Python
API only: the browser is Debian's, nothing is downloaded). It starts `instructflow ui` on a
free port, opens the links instructflow prints (the experiment's runs with the stored columns,
the newest run's overview with its base vs fine-tuned table), that run's metric charts and
base_vs_tuned.png, and the compare view of the two newest runs; saves docs/ui/{experiment,
run-overview,run-metrics,base-vs-tuned,compare}.png.

    python docs/screenshots.py --home .instructflow --prefect   # the Prefect UI instead

opens the newest flow run's Artifacts tab in the workspace's Prefect UI (the stages' reports)
and one of them, evaluate's; saves docs/ui/prefect-{artifacts,evaluate}.png.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", required=True, help="the workspace (INSTRUCTFLOW_HOME)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "ui"), help="where the PNGs go")
    ap.add_argument("--chromium", default="/usr/bin/chromium", help="the browser binary")
    ap.add_argument("--prefect", action="store_true", help="the Prefect UI's flow run page")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.prefect:
        return prefect_artifacts(Path(args.home).resolve(), out, args.chromium)

    port = free_port()
    env = {**os.environ, "INSTRUCTFLOW_HOME": str(Path(args.home).resolve())}
    cmd = [sys.executable, "-m", "instructflow.cli", "ui", "--port", str(port)]
    ui = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        api = f"{base}/ajax-api/2.0/mlflow"
        exps = httpx.post(f"{api}/experiments/search", json={"max_results": 100}).json()
        exp = next(e for e in exps["experiments"] if e["name"] != "Default")
        runs = httpx.post(
            f"{api}/runs/search",
            json={"experiment_ids": [exp["experiment_id"]], "order_by": ["start_time DESC"]},
        ).json()["runs"]
        ids = [r["info"]["run_id"] for r in runs[:2]]
        from instructflow import mlflow_view

        exp_id = exp["experiment_id"]
        run = mlflow_view.run_url(base, exp_id, ids[0])
        pages = {
            # The links instructflow prints: "Model training", the stored columns.
            "experiment": mlflow_view.experiment_url(base, exp_id),
            "run-overview": run,
            "run-metrics": run.replace("?", "/model-metrics?"),
            "base-vs-tuned": run.replace("?", "/artifacts/evaluate/base_vs_tuned.png?"),
            "compare": f"{base}/#/compare-runs?runs={json.dumps(ids)}"
            f"&experiments={json.dumps([exp_id])}&workflowType=machine_learning",
        }
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_FLAGS)
            page = browser.new_page(viewport={"width": 1600, "height": 1000})
            for name, url in pages.items():
                page.goto(url)
                page.wait_for_load_state("load")  # the UI polls: "networkidle" never comes
                time.sleep(6)  # charts render after the data arrives
                _tidy(page, name)
                page.screenshot(path=str(out / f"{name}.png"), full_page=False)
                print(f"{out / f'{name}.png'}  <- {url}")
            browser.close()
    finally:
        os.killpg(ui.pid, signal.SIGTERM)
        ui.wait(timeout=30)


def prefect_artifacts(home: Path, out: Path, chromium: str) -> None:
    """The newest flow run's Artifacts tab: each stage's report (instructflow.prefect_report)."""
    os.environ["INSTRUCTFLOW_HOME"] = str(home)
    from instructflow import prefect_server

    api = prefect_server.ensure(home)
    runs = httpx.post(
        f"{api}/flow_runs/filter", json={"sort": "START_TIME_DESC", "limit": 1}, timeout=30
    ).json()
    url = f"{prefect_server.ui_url(api)}/runs/flow-run/{runs[0]['id']}?tab=Artifacts"
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=CHROMIUM_FLAGS)
        page = browser.new_page(viewport={"width": 1600, "height": 1300})
        page.goto(url)
        page.wait_for_load_state("load")
        time.sleep(5)
        page.get_by_text("Artifacts", exact=True).last.click(timeout=10000)
        time.sleep(6)  # the UI fetches the artifacts after the tab opens
        page.screenshot(path=str(out / "prefect-artifacts.png"), full_page=True)
        # One report opened: evaluate's base vs fine-tuned table and its caveats.
        page.get_by_text("instructflow-evaluate", exact=True).first.click(timeout=10000)
        time.sleep(6)
        page.screenshot(path=str(out / "prefect-evaluate.png"), full_page=True)
        browser.close()
    print(f"{out}/prefect-{{artifacts,evaluate}}.png  <- {url}")


def _tidy(page, name: str) -> None:
    """Close MLflow 3.17's assistant panel (it hides a third of the page) and, on the metrics
    page, show the training curves. Best effort: a UI change leaves the plain page."""
    try:
        page.locator("[aria-label='Close']").last.click(timeout=3000)
    except Exception:
        pass
    if name == "run-overview":
        try:  # the description (base | fine-tuned, then the stages) in full
            page.get_by_text("Show more", exact=True).first.click(timeout=3000)
        except Exception:
            pass
    if name == "run-metrics":
        try:
            page.get_by_placeholder("Search metric charts").fill("train/", timeout=3000)
        except Exception:
            pass
    time.sleep(3)


if __name__ == "__main__":
    main()
