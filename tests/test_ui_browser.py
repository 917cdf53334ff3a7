"""A real browser on the standalone UI: Debian's chromium driven by Playwright (never `playwright install`).

Chooses two LoRAs, strengths and a preset, merges, reads the message and the new file; fills rows from
a prompt; opens Inspect and sees the table and the chart; bakes; extracts a LoRA from two checkpoints
and resizes it. Screenshots go to artifacts/screenshots/.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from uikit import checkpoint_folder, lora_folder, need, write_small_lora

from lib_loramerge.formats.safetensors_io import read_header
from lib_loramerge.jobs import RECIPE_KEY

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path(os.environ.get("LORAMERGE_CHROMIUM", "/usr/bin/chromium"))
SHOTS = ROOT / "artifacts" / "screenshots"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--no-first-run", "--disable-sync"]
TIMEOUT_MS = 60_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_serving(url: str, server: subprocess.Popen, seconds: float = 180) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise AssertionError(f"the ui command exited with {server.returncode}:\n{server.stdout.read()}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise AssertionError(f"nothing served at {url} after {seconds} s")


@pytest.fixture(scope="module")
def standalone(tmp_path_factory):
    try:
        import gradio  # noqa: F401
        import playwright.sync_api  # noqa: F401
        have = True
    except ImportError:
        have = False
    need(have, "gradio or playwright is not installed in this environment")
    need(CHROMIUM.is_file(), f"{CHROMIUM} not found (Debian's chromium: apt-get install chromium)")
    root = tmp_path_factory.mktemp("standalone")
    loras = lora_folder(root)
    checkpoints = checkpoint_folder(root)  # + narrow LoRAs that fit it, in the same LoRA folder
    port = free_port()
    env = {**os.environ, "GRADIO_ANALYTICS_ENABLED": "False", "PYTHONUNBUFFERED": "1"}
    server = subprocess.Popen([sys.executable, "-m", "lib_loramerge", "ui", "--lora-dir", str(loras),
                               "--ckpt-dir", str(checkpoints), "--port", str(port), "--device", "cpu"],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=ROOT,
                              start_new_session=True)
    try:
        wait_until_serving(f"http://127.0.0.1:{port}/", server)
        yield f"http://127.0.0.1:{port}", loras, checkpoints
    finally:
        os.killpg(server.pid, signal.SIGTERM)  # our own process group only
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(20)


@pytest.fixture
def page(standalone):
    from playwright.sync_api import sync_playwright

    url = standalone[0]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            # everything stays on loopback (gradio asks for web fonts and a CDN script; there is no internet)
            page.route("**/*", lambda r: r.continue_() if r.request.url.startswith(url) else r.abort())
            page.set_default_timeout(TIMEOUT_MS)
            page.goto(url + "/", wait_until="domcontentloaded")
            page.wait_for_selector("#lora_merger_merge_lora_0 input")
            yield page
        finally:
            browser.close()


def pick(page, elem_id: str, value: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f'#{elem_id} li[data-testid="dropdown-option"][data-value="{value}"]').click()
    assert page.locator(f"#{elem_id} input").input_value() == value


def type_number(page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input")
    box.fill(str(value))
    box.press("Tab")


def result_text(page, elem_id: str) -> str:
    page.wait_for_function(f"() => document.querySelector('#{elem_id} textarea').value.length > 0")
    return page.locator(f"#{elem_id} textarea").input_value()


def shoot(page, name: str) -> None:
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.wait_for_timeout(800)  # let gradio's "pending" fade on the outputs finish
    page.screenshot(path=str(SHOTS / name), full_page=True)


def test_merge_two_loras_in_the_browser_then_inspect_the_result(standalone, page):
    loras = standalone[1]
    pick(page, "lora_merger_merge_lora_0", "style_a.safetensors")
    pick(page, "lora_merger_merge_lora_1", "character_b.safetensors")
    type_number(page, "lora_merger_merge_unet_0", 0.8)
    type_number(page, "lora_merger_merge_te_0", 0.6)
    type_number(page, "lora_merger_merge_unet_1", -0.5)
    pick(page, "lora_merger_merge_weights_1", "MIDD")
    page.locator("#lora_merger_merge_output textarea").fill("from_browser")
    page.locator("#lora_merger_merge_button").click()
    message = result_text(page, "lora_merger_merge_result")
    out = loras / "from_browser.safetensors"
    assert message.startswith(f"wrote {out} (SD1, svd of 2 LoRAs"), message
    assert out.is_file()
    recipe = json.loads(read_header(out).metadata[RECIPE_KEY])
    assert [(i["file"], i["unet"], i["te"], i.get("lbw")) for i in recipe["inputs"]] == [
        ("style_a.safetensors", 0.8, 0.6, None), ("character_b.safetensors", -0.5, 1.0, "MIDD")]
    chart = page.locator("#lora_merger_merge_chart")
    chart.locator(".vega-embed canvas").wait_for()  # the energy-per-block chart of the svd merge (vega-lite)
    shoot(page, "merge.png")

    page.locator("#lora_merger_panels .tab-nav button", has_text="Inspect").click()
    pick(page, "lora_merger_inspect_lora", "from_browser.safetensors")  # the new file is in the list
    page.locator("#lora_merger_inspect_button").click()
    table = page.locator("#lora_merger_inspect_table table")
    table.wait_for()
    assert "architecture SD1" in " ".join(table.inner_text().split())
    page.locator("#lora_merger_inspect_chart .vega-embed canvas").wait_for()
    assert "from_browser.safetensors: SD1" in page.locator("#lora_merger_inspect_summary").first.inner_text()
    shoot(page, "inspect.png")


def test_bad_name_and_prompt_rows_in_the_browser(standalone, page):
    loras = standalone[1]
    pick(page, "lora_merger_merge_lora_0", "detail_c.safetensors")
    page.locator("#lora_merger_merge_output textarea").fill("../outside")
    page.locator("#lora_merger_merge_button").click()
    assert result_text(page, "lora_merger_merge_result").startswith("error: output name '../outside' must be a bare")
    assert not (loras.parent / "outside.safetensors").exists()

    page.locator("#lora_merger_merge_prompt_box").get_by_text("Fill the rows from a prompt").click()
    page.locator("#lora_merger_merge_prompt textarea").fill("<lora:style_a:0.4:0.9> <lora:character_b:1:lbw=OUTALL>"
                                                           " <lora:detail_c:0.3>")
    page.locator("#lora_merger_merge_fill").click()
    page.locator("#lora_merger_merge_fill_message").get_by_text("Filled 3 rows from the prompt.").first.wait_for()
    assert page.locator("#lora_merger_merge_row_2").is_visible()
    assert page.locator("#lora_merger_merge_lora_2 input").input_value() == "detail_c.safetensors"
    assert page.locator("#lora_merger_merge_weights_1 input").input_value() == "OUTALL"
    assert page.locator("#lora_merger_merge_unet_0 input").input_value() == "0.9"
    assert page.locator("#lora_merger_merge_te_0 input").input_value() == "0.4"
    shoot(page, "from_prompt.png")


def test_bake_in_the_browser(standalone, page):
    checkpoints = standalone[2]
    page.locator("#lora_merger_panels .tab-nav button", has_text="Bake").click()
    pick(page, "lora_merger_bake_checkpoint", "base_sd1.safetensors")
    pick(page, "lora_merger_bake_lora_0", "narrow_a.safetensors")
    pick(page, "lora_merger_bake_lora_1", "narrow_b.safetensors")
    type_number(page, "lora_merger_bake_unet_1", 0.5)
    page.locator("#lora_merger_bake_output textarea").fill("baked_in_browser")
    page.locator("#lora_merger_bake_button").click()
    message = result_text(page, "lora_merger_bake_result")
    out = checkpoints / "baked_in_browser.safetensors"
    assert message.startswith(f"wrote {out} (SD1 checkpoint base_sd1.safetensors + narrow_a, narrow_b)"), message
    assert out.is_file()
    shoot(page, "bake.png")
    page.locator("#lora_merger_bake_checkpoint input").click()  # the new checkpoint is in the list
    page.locator('#lora_merger_bake_checkpoint li[data-value="baked_in_browser.safetensors"]').wait_for()


def test_refresh_and_row_buttons_in_the_browser(standalone, page):
    loras = standalone[1]
    assert not page.locator("#lora_merger_merge_row_2").is_visible()
    page.locator("#lora_merger_merge_add").click()
    page.locator("#lora_merger_merge_row_2").wait_for(state="visible")
    write_small_lora(loras / "arrived_later.safetensors", 42)
    page.locator("#lora_merger_merge_refresh_2").click()  # 🔄 re-reads the folder
    pick(page, "lora_merger_merge_lora_2", "arrived_later.safetensors")
    page.locator("#lora_merger_merge_remove").click()  # hides the row and clears its LoRA
    page.locator("#lora_merger_merge_row_2").wait_for(state="hidden")
    page.locator("#lora_merger_merge_add").click()
    page.locator("#lora_merger_merge_row_2").wait_for(state="visible")
    assert page.locator("#lora_merger_merge_lora_2 input").input_value() == ""


def test_extract_then_resize_in_the_browser(standalone, page):
    import torch

    from lib_loramerge.formats.reader import read_lora
    from lib_loramerge.jobs import bake_to_file
    from lib_loramerge.ops.merge import MergeInput

    loras, checkpoints = standalone[1], standalone[2]
    bake_to_file(checkpoints / "base_sd1.safetensors", [MergeInput(read_lora(loras / "narrow_b.safetensors"))],
                 checkpoints / "tuned_for_extract.safetensors", dtype=torch.float32, overwrite=True)
    page.locator("#lora_merger_panels .tab-nav button", has_text="Extract").click()  # lists the new checkpoint
    pick(page, "lora_merger_extract_base", "base_sd1.safetensors")
    pick(page, "lora_merger_extract_tuned", "tuned_for_extract.safetensors")
    type_number(page, "lora_merger_extract_rank", 4)
    page.locator("#lora_merger_extract_output textarea").fill("extracted_in_browser")
    page.locator("#lora_merger_extract_button").click()
    message = result_text(page, "lora_merger_extract_result")
    out = loras / "extracted_in_browser.safetensors"
    assert message.startswith(f"wrote {out} (SD1 LoRA: tuned_for_extract.safetensors − base_sd1.safetensors)"), message
    assert set(read_lora(out).modules) == set(read_lora(loras / "narrow_b.safetensors").modules)
    page.locator("#lora_merger_extract_chart .vega-embed canvas").wait_for()
    shoot(page, "extract.png")

    page.locator("#lora_merger_panels .tab-nav button", has_text="Resize").click()
    pick(page, "lora_merger_resize_lora", "extracted_in_browser.safetensors")  # listed after the extraction
    page.locator("#lora_merger_resize_policy label", has_text="sv_ratio").click()
    type_number(page, "lora_merger_resize_value", 2)
    page.locator("#lora_merger_resize_output textarea").fill("resized_in_browser")
    page.locator("#lora_merger_resize_button").click()
    message = result_text(page, "lora_merger_resize_result")
    resized = loras / "resized_in_browser.safetensors"
    # (a narrow test LoRA's shapes name no SD version: "unknown" here, SD1 for a real one)
    assert message.startswith(f"wrote {resized} (") and "resized extracted_in_browser: keep σ ≥ σ_max/2" in message
    assert max(m.rank for m in read_lora(resized).modules.values()) <= 4
    shoot(page, "resize.png")
