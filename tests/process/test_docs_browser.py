"""/docs in a real browser: headless Chromium (Debian's `chromium`, driven by Playwright) loads the page
from a gateway process in front of the fake vLLM, sees the operations, fetches nothing from outside
the gateway, and an embeddings call made from the page ("Authorize", "Try it out", "Execute")
answers 200. A screenshot is kept in tests/artifacts/ (git-ignored).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from tests.procs import ROOT

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = ROOT / "tests" / "artifacts"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason="needs Debian's chromium (make system-deps installs it)")


def test_docs_page_works_offline_and_calls_embeddings(make_gateway, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    gw = make_gateway(RATE_LIMIT="100000/minute")
    origin = "{0.scheme}://{0.netloc}".format(urlsplit(gw.url))
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(
            str(tmp_path / "profile"), executable_path=CHROMIUM, headless=True, args=ARGS,
            viewport={"width": 1280, "height": 2000})
        try:
            page = browser.new_page()
            page.on("request", lambda r: requests.append(r.url))
            page.goto(gw.url + "/")  # redirects to /docs
            assert page.url == gw.url + "/docs"
            op = page.locator("#operations-embeddings-post_v1_embeddings")
            expect(op).to_be_visible(timeout=20_000)
            listed = page.locator(".opblock-summary-path").all_inner_texts()
            assert {"/v1/embeddings", "/v1/models", "/health"} <= {t.strip().replace("\u200b", "") for t in listed}

            page.locator("button.authorize").first.click()
            bearer = page.locator(".modal-ux .auth-container").filter(has_text="bearer").first
            bearer.locator("input").fill(gw.key)
            bearer.locator("button.authorize").click()
            expect(bearer.locator("button", has_text="Logout")).to_be_visible()
            page.locator(".modal-ux button.btn-done").first.click()

            op.locator(".opblock-summary").click()
            op.locator("button.try-out__btn").click()
            op.locator("button.execute").click()
            status = op.locator(".live-responses-table .response .response-col_status").first
            expect(status).to_have_text("200", timeout=20_000)
            expect(op.locator(".live-responses-table tr.response .response-col_description")).to_contain_text('"embedding"')
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "docs-embeddings.png"), full_page=True)
        finally:
            browser.close()

    outside = [u for u in requests if not u.startswith(origin + "/") and not u.startswith(("data:", "blob:"))]
    assert not outside, f"the page fetched from outside the gateway: {outside}"
    assert gw.url + "/openapi.json" in requests and gw.url + "/v1/embeddings" in requests
