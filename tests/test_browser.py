"""A real JupyterLab in headless Chromium: open notebooks/00-dashboard.ipynb, Run All Cells from the menu,
and check that the dashboard renders: the GPU picker, the plan bars and the caption gallery.

JupyterLab runs as a subprocess of this test (a free localhost port, a random token, a temporary copy
of notebooks/ as its root, this interpreter's environment for the kernel) and is always shut down by
the fixture's finalizer. The browser is Debian's chromium driven by Playwright's sync API (no
Playwright browser download). Screenshots go to the test's tmp_path; ``docs/dashboard.png`` (the README
picture) is written when it is missing or when VLMLAB_UPDATE_SCREENSHOTS=1.

Skipped only when chromium is absent (scripts/test.sh installs it with apt-get).
"""
from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = "00-dashboard.ipynb"
README_SHOT = REPO / "docs" / "dashboard.png"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SERVER_START_S = 60
RUN_ALL_S = 150  # the cells: import, caption 8 images on CPU, plan a 7B model from its config


def chromium_path() -> str | None:
    for candidate in (os.environ.get("VLMLAB_CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            return candidate
    return None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clear_outputs(path: Path):
    """Open the copy without its stored outputs: whatever renders then comes from this run."""
    nb = json.loads(path.read_text())
    for cell in nb["cells"]:
        if cell["cell_type"] == "code":
            cell["outputs"], cell["execution_count"] = [], None
    nb.get("metadata", {}).pop("widgets", None)
    path.write_text(json.dumps(nb, indent=1))


@pytest.fixture
def chromium():
    path = chromium_path()
    if path is None:
        pytest.skip("chromium is not installed (apt-get install chromium; scripts/test.sh does): no real browser to drive")
    return path


@pytest.fixture
def lab(chromium, tmp_path, request):
    """A JupyterLab server on a free port with a token; yields (base url, token); always stopped."""
    root = tmp_path / "notebooks"
    shutil.copytree(REPO / "notebooks", root, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    clear_outputs(root / NOTEBOOK)
    config, data, runtime = (tmp_path / n for n in ("jupyter-config", "jupyter-data", "jupyter-runtime"))
    (config / "labconfig").mkdir(parents=True)
    # no "news" question in a toast over the screenshot
    (config / "labconfig" / "page_config.json").write_text(json.dumps(
        {"disabledExtensions": {"@jupyterlab/apputils-extension:announcements": True}}))
    settings = tmp_path / "lab-settings"
    workspaces = tmp_path / "lab-workspaces"
    token, port = secrets.token_hex(16), free_port()
    # a fresh config and data dir: no user kernelspec or setting shadows this environment's python3 kernel
    env = dict(os.environ, JUPYTER_CONFIG_DIR=str(config), JUPYTER_DATA_DIR=str(data),
               JUPYTER_RUNTIME_DIR=str(runtime), PYTHONUNBUFFERED="1")
    log_path = tmp_path / "jupyterlab.log"
    log = open(log_path, "w")
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.user_settings_dir={settings}", f"--LabApp.workspaces_dir={workspaces}",
           "--ServerApp.terminals_enabled=False", "--ServerApp.allow_root=True",  # CI containers run as root
           "--LabApp.extension_manager=readonly", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]  # offline: nothing fetched
    server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=root, start_new_session=True)
    base = f"http://127.0.0.1:{port}"

    def stop():
        if server.poll() is None:
            try:  # the server's own shutdown also shuts its kernels down
                req = urllib.request.Request(f"{base}/api/shutdown", method="POST",
                                             headers={"Authorization": f"token {token}"})
                urllib.request.urlopen(req, timeout=5).close()
                server.wait(timeout=15)
            except (OSError, subprocess.TimeoutExpired):
                pass
        if server.poll() is None:
            server.terminate()
            try:
                server.wait(timeout=10)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait(timeout=10)
        try:  # the kernel (and any worker it spawned) shares the server's process group
            os.killpg(server.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        log.close()

    request.addfinalizer(stop)
    deadline = time.monotonic() + SERVER_START_S
    while True:
        if server.poll() is not None:
            pytest.fail(f"JupyterLab exited with code {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=2) as r:
                if r.status == 200:
                    break
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"JupyterLab did not answer within {SERVER_START_S} s:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.25)
    return base, token, log_path


def test_dashboard_renders_in_jupyterlab(chromium, lab, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    base, token, log_path = lab
    with sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            str(tmp_path / "chromium-profile"), executable_path=chromium, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": 1400, "height": 1000})
        try:
            page = context.pages[0] if context.pages else context.new_page()
            page.set_default_timeout(60_000)
            page.goto(f"{base}/lab/tree/{NOTEBOOK}?token={token}", wait_until="domcontentloaded")
            notebook = page.locator(".jp-NotebookPanel").first
            expect(notebook).to_be_visible(timeout=60_000)
            # the kernel (python3 of this environment) is up before running anything; Run All before that
            # asks which kernel to start instead of running
            kernel_idle = page.locator(".jp-StatusBar-TextItem", has_text=re.compile(r"Python 3.* \| Idle$"))
            expect(kernel_idle.first).to_be_visible(timeout=60_000)

            # Run -> Run All Cells, as a user would
            page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(r"^Run$")).click()
            page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Run All Cells$")).click()

            dashboard = page.locator(".vlmlab-dashboard").first
            expect(dashboard).to_be_visible(timeout=RUN_ALL_S * 1000)
            # every cell ran: no "[*]" prompt left, the kernel idle again, no error output
            expect(page.locator(".jp-InputPrompt", has_text="[*]")).to_have_count(0, timeout=RUN_ALL_S * 1000)
            expect(kernel_idle.first).to_be_visible(timeout=RUN_ALL_S * 1000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']",
                                  has_text="Traceback")
            assert errors.count() == 0, "a cell raised:\n" + "\n".join(errors.all_inner_texts())

            tabs = dashboard.locator(".lm-TabBar-tab")

            # GPUs tab: the picker with the virtual box of two 24 GiB GPUs
            tabs.filter(has_text="GPUs").first.click()
            picker = dashboard.locator(".vlmlab-gpu-picker")
            expect(picker).to_be_visible()
            expect(picker).to_contain_text("selected 2 device(s)")

            # Caption tab: the gallery of the bundled samples, thumbnails loaded
            tabs.filter(has_text="Caption").first.click()
            gallery = dashboard.locator(".vlmlab-caption-gallery .vlmlab-captions")
            expect(gallery).to_be_visible()
            expect(gallery).to_contain_text("8 captioned, 0 error(s)")
            thumbs = gallery.locator("img")
            expect(thumbs).to_have_count(8)
            assert all(thumbs.nth(i).evaluate("img => img.complete && img.naturalWidth > 0") for i in range(8))
            page.wait_for_timeout(300)
            dashboard.screenshot(path=str(tmp_path / "dashboard-caption.png"))

            # Plan tab: the stacked bars of llava-1.5-7b split over the two GPUs, and the placement table
            tabs.filter(has_text="Plan").first.click()
            bars = dashboard.locator("img.vlmlab-plan-bars")
            expect(bars).to_be_visible()
            page.wait_for_function("img => img.complete && img.naturalWidth > 100", arg=bars.element_handle())
            expect(dashboard.locator(".vlmlab-placement")).to_contain_text("model.vision_tower")
            expect(dashboard.locator(".vlmlab-plan-editor")).to_contain_text("strategy")
            page.wait_for_timeout(300)
            shot = tmp_path / "dashboard.png"
            dashboard.screenshot(path=str(shot))
        except Exception:
            page.screenshot(path=str(tmp_path / "failure.png"))
            print(f"failure screenshot: {tmp_path / 'failure.png'}; JupyterLab log: {log_path}")
            raise
        finally:
            context.close()

    assert shot.stat().st_size > 10_000
    if os.environ.get("VLMLAB_UPDATE_SCREENSHOTS") == "1" or not README_SHOT.exists():
        README_SHOT.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, README_SHOT)
    print(f"screenshots: {shot}, {tmp_path / 'dashboard-caption.png'}")
