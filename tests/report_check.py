"""Open a Snakemake report in Debian's headless chromium and check it really renders.

Checks, in a real browser: the page loads without script errors; every
category of results opens; every result embedded in the report decodes, and
every image among them loads (non-zero natural size); no link points to a
file that is missing.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
# As root in a container: no sandbox; no GPU; no background traffic on a closed network.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]

# Decode every embedded result; load the images.
_CHECK_RESULTS = """
async () => {
  const out = [];
  for (const [path, r] of Object.entries(results)) {
    const entry = {path: path, mime: r.mime_type, ok: false, detail: ""};
    try {
      const blob = await (await fetch(r.data_uri)).blob();
      entry.bytes = blob.size;
      if (r.mime_type.startsWith("image/")) {
        const img = new Image();
        await new Promise((resolve) => { img.onload = resolve; img.onerror = resolve; img.src = r.data_uri; });
        entry.ok = img.naturalWidth > 0 && img.naturalHeight > 0;
        entry.detail = `${img.naturalWidth}x${img.naturalHeight}`;
      } else {
        entry.ok = blob.size > 0;
      }
    } catch (err) { entry.detail = String(err); }
    out.push(entry);
  }
  return out;
}
"""


def check_report_in_chromium(report: Path, tmp_path: Path) -> list[dict]:
    """Raise AssertionError on any rendering problem; returns the per-result checks."""
    if not CHROMIUM.exists():
        if os.geteuid() != 0:
            pytest.skip(f"{CHROMIUM} missing and not root: .ci/install (as root) installs Debian's chromium")
        pytest.fail(f"{CHROMIUM} missing: .ci/install installs Debian's chromium")
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.on("pageerror", lambda err: errors.append(f"script error: {err}"))
        page.on("requestfailed", lambda req: errors.append(f"failed request: {req.url[:120]}"))
        page.goto(report.resolve().as_uri())
        page.wait_for_selector("text=RESULTS", timeout=30_000)
        categories = page.evaluate("Object.keys(categories)")
        assert categories, "the report lists no result categories"
        for category in categories:
            page.get_by_text(category, exact=True).first.click()
            page.wait_for_timeout(200)
            assert page.locator("table, a").count() > 0, f"category {category} shows nothing"
            page.goto(report.resolve().as_uri())
            page.wait_for_selector("text=RESULTS", timeout=30_000)
        checks = page.evaluate(_CHECK_RESULTS)
        hrefs = page.eval_on_selector_all("a[href]", "els => els.map(e => e.getAttribute('href'))")
        page.screenshot(path=str(tmp_path / "report.png"))
        browser.close()
    broken = [c for c in checks if not c["ok"]]
    assert not broken, f"results that do not load: {broken}"
    assert any(c["mime"].startswith("image/") for c in checks), "no images in the report"
    for href in hrefs:
        if href.startswith(("#", "data:", "http://", "https://", "mailto:", "javascript:")):
            continue
        assert (report.parent / href).exists(), f"broken link in the report: {href}"
    assert not errors, errors
    return checks
