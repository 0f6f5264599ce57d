"""What a person does in the MLflow UI to approve a version: open the version's page, open
the aliases dialog, add the alias `approved`, save. The tests and `shadowgate scenario adapt`
use it to approve a version the way a person does, so the registry sees the same request
(and sends the same webhook) as from a real click; the service itself never needs a browser.

Driven by Playwright (sync API) in headless Chromium: the system's package (Debian
`chromium`, which `make test` installs), since Playwright's own browser download is not
reachable here. Facts of MLflow 3.17's UI this relies on (measured):
- the page is `#/models/NAME/versions/N` (hash routing) and renders a skeleton first, so the
  aliases control is waited for, not network idle; a version that does not exist renders
  "Model NAME vN does not exist" instead;
- the dialog holds a multi-select combobox: typing the alias offers it as an option (twice
  when another version holds it: the first is taken, and the alias moves on save), Enter
  makes a chip, and Enter on an alias that is already a chip removes it;
- "Save aliases" (disabled until something changed) POSTs ALIAS_POST.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from urllib.parse import quote

ALIAS_POST = "/ajax-api/2.0/mlflow/registered-models/alias"
ALIASES_CONTROL = 'button[title="Add aliases"], button[title="Edit aliases"]'
NOT_FOUND_TEXT = "does not exist"


class UIError(RuntimeError):
    """The UI did not let the alias be set; the message names what was not found."""


def chromium_path() -> str | None:
    """The system's Chromium, or None where it is not installed."""
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").exists() else None


def set_alias_in_ui(ui_url: str, model_name: str, version: str, alias: str = "approved",
                    chromium: str | None = None, timeout_s: float = 60.0,
                    screenshot: Path | None = None) -> float:
    """Add `alias` to `version` of `model_name` through the UI at `ui_url`; returns the seconds
    it took. Does nothing if the alias is already this version's. All steps together get
    `timeout_s`; on failure raises UIError (and saves a screenshot where `screenshot` says)."""
    try:
        from playwright.sync_api import Error as PlaywrightError
        from playwright.sync_api import sync_playwright
    except ImportError:
        raise UIError("Playwright is not installed: `pip install -e '.[test]'` (`make test` does)") from None
    exe = chromium or chromium_path()
    if exe is None or not Path(exe).exists():
        raise UIError(f"no Chromium at {exe or 'chromium'}: install the Debian package `chromium` "
                      f"(`make browser`; `make test` does)")

    t0 = time.monotonic()
    deadline = t0 + timeout_s

    def left_ms() -> float:
        return max(1.0, (deadline - time.monotonic()) * 1000)

    url = f"{ui_url.rstrip('/')}/#/models/{quote(model_name, safe='')}/versions/{quote(str(version), safe='')}"
    where = f"{model_name} version {version} ({url})"
    with sync_playwright() as pw:
        try:
            browser = pw.chromium.launch(executable_path=exe, headless=True,
                                         args=["--no-sandbox"] if os.geteuid() == 0 else [])
        except PlaywrightError as exc:
            raise UIError(f"Chromium at {exe} did not start: {str(exc).splitlines()[0]}") from None
        page = browser.new_page()
        try:
            try:
                page.goto(url, timeout=left_ms())
            except PlaywrightError as exc:
                raise UIError(f"the page of {where} did not load: {str(exc).splitlines()[0]}") from None
            step = "the aliases control (Add/Edit aliases) or a not-found message"
            control = page.locator(ALIASES_CONTROL).first
            missing = page.get_by_text(NOT_FOUND_TEXT).first
            control.or_(missing).wait_for(state="visible", timeout=left_ms())
            if not control.is_visible():
                raise UIError(f"no aliases control on the page of {where}: the UI says "
                              f"{missing.inner_text().strip()!r}")
            control.click(timeout=left_ms())
            step = "the aliases dialog"
            dialog = page.get_by_role("dialog")
            dialog.wait_for(state="visible", timeout=left_ms())
            # a chip is a role=status element titled with the alias
            if dialog.locator(f'[role="status"][title="{alias}"]').count():
                return time.monotonic() - t0  # already this version's: Enter would remove it
            step = "the aliases combobox"
            box = dialog.get_by_role("combobox").first
            box.click(timeout=left_ms())
            box.fill(alias, timeout=left_ms())
            step = f"the option {alias!r} offered for the typed alias"
            page.get_by_role("option", name=alias, exact=True).first.wait_for(state="attached", timeout=left_ms())
            box.press("Enter")  # takes the first (active) option
            step = f"the chip {alias!r} after Enter"
            dialog.locator(f'[role="status"][title="{alias}"]').wait_for(state="visible", timeout=left_ms())
            step = "an enabled Save aliases button"
            save = dialog.get_by_role("button", name="Save aliases")
            with page.expect_response(lambda r: ALIAS_POST in r.url and r.request.method == "POST",
                                      timeout=left_ms()) as resp:
                save.click(timeout=left_ms())  # waits for it to be enabled
                step = f"the response to the POST {ALIAS_POST}"
            if resp.value.status != 200:
                raise UIError(f"MLflow refused alias {alias!r} on {where}: HTTP {resp.value.status} "
                              f"{resp.value.text()[:200]}")
            return time.monotonic() - t0
        except (UIError, PlaywrightError) as exc:
            if screenshot is not None:
                try:
                    page.screenshot(path=str(screenshot))
                except PlaywrightError:
                    pass
            if isinstance(exc, UIError):
                raise
            raise UIError(f"{step} not found within {timeout_s:.0f} s on the page of {where}: "
                          f"{str(exc).splitlines()[0]}") from None
        finally:
            browser.close()
