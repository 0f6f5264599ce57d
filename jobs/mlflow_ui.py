"""What a person does in the MLflow UI to approve a version: open the version's page and add
the alias `approved`. Driven in headless Chromium (the system's package) by Playwright, for
the tests and for demonstrations; the service itself never needs a browser.

MLflow 3.17's page is `#/models/NAME/versions/N` (hash routing). It renders a skeleton
first, so the aliases control is waited for, not network idle. The dialog holds a
multi-select combobox: type the alias, Enter makes a chip, "Save aliases" posts it.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

ALIAS_POST = "/ajax-api/2.0/mlflow/registered-models/alias"


class UIError(RuntimeError):
    pass


def chromium_path() -> str | None:
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def set_alias_in_ui(ui_url: str, model_name: str, version: str, alias: str = "approved",
                    chromium: str | None = None, timeout_s: float = 60.0, screenshot: Path | None = None) -> float:
    """Add `alias` to `version` through the UI; returns the seconds it took."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    exe = chromium or chromium_path()
    if exe is None:
        raise UIError("no Chromium found: install the Debian package `chromium` (`make test` does)")
    t0 = time.time()
    ms = int(timeout_s * 1000)
    url = f"{ui_url.rstrip('/')}/#/models/{model_name}/versions/{version}"
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, headless=True,
                                     args=["--no-sandbox"] if os.geteuid() == 0 else [])
        page = browser.new_page()
        try:
            page.goto(url, timeout=ms)
            control = page.locator('button[title="Add aliases"], button[title="Edit aliases"]').first
            try:
                control.wait_for(state="visible", timeout=ms)
            except PlaywrightError:
                raise UIError(f"the page of {model_name} version {version} shows no aliases control "
                              f"within {timeout_s:.0f} s ({url}): no such version?") from None
            control.click()
            dialog = page.get_by_role("dialog")
            dialog.wait_for(state="visible", timeout=ms)
            chips = dialog.inner_text()
            box = dialog.get_by_role("combobox").first
            box.click()
            box.fill(alias)
            option = page.get_by_role("option", name=alias, exact=True).first
            if alias in chips.split() and not option.is_visible():
                return time.time() - t0  # already this version's
            box.press("Enter")
            save = dialog.get_by_role("button", name="Save aliases")
            if not save.is_enabled():  # the alias was already a chip: Enter removed it; put it back
                box.fill(alias)
                box.press("Enter")
                if not save.is_enabled():
                    return time.time() - t0
            with page.expect_response(lambda r: ALIAS_POST in r.url and r.request.method == "POST",
                                      timeout=ms) as resp:
                save.click()
            if resp.value.status != 200:
                raise UIError(f"MLflow refused the alias: HTTP {resp.value.status} {resp.value.text()[:200]}")
            return time.time() - t0
        except PlaywrightError as exc:
            raise UIError(f"the MLflow UI did not let the alias be set: {str(exc).splitlines()[0]}") from None
        finally:
            if screenshot is not None:
                try:
                    page.screenshot(path=str(screenshot))
                except PlaywrightError:
                    pass
            browser.close()
