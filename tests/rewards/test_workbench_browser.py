"""The rating workbench driven in a real headless browser (Debian's chromium, Playwright).

`make test` installs chromium (the `browser` target) and sets MEDRL_REQUIRE_BROWSER=1, so
on CI these tests fail rather than skip when the browser is missing. With
MEDRL_WORKBENCH_SHOTS=DIR the test saves the screenshots docs/rating.md shows.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from rewards.agreement import agreement_report
from rewards.ratings import export_ratings, ingest_ratings, read_ratings
from rewards.workbench.app import Background
from rewards.workbench.store import Rater, Workbench
from tests.rewards.workbench_round import make_round

CHROMIUM = os.environ.get("MEDRL_CHROMIUM", "/usr/bin/chromium")
# as the machine's own probe starts it: no background traffic to a closed network
FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]  # fmt: skip


@pytest.fixture(scope="module")
def browser():
    missing = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        missing = "playwright is not installed (pip install -e '.[test]')"
    if missing is None and not shutil.which(CHROMIUM):
        missing = f"{CHROMIUM}: no chromium (make browser, or apt-get install chromium)"
    if missing:
        if os.environ.get("MEDRL_REQUIRE_BROWSER") == "1":
            pytest.fail(missing)
        pytest.skip(missing)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=shutil.which(CHROMIUM), headless=True, args=FLAGS)
        yield b
        b.close()


def expect(locator):
    from playwright.sync_api import expect as pw_expect

    return pw_expect(locator)


def item_id(page) -> str:
    return page.get_attribute("#image", "src").rsplit("/", 1)[-1]


def press_and_wait(page, keys: list[str], answered_before: int) -> None:
    """Press `keys`, then wait until the answer is counted and the page has moved on.

    The page counts the answer before it loads the next item, so the progress text alone
    does not say that the image shown is already the next one.
    """
    before = page.get_attribute("#image", "src")
    for key in keys:
        page.keyboard.press(key)
    expect(page.locator("#progress")).to_have_text(re.compile(rf"^{answered_before + 1} of "))
    page.wait_for_function(
        "src => !document.getElementById('done').hidden"
        " || document.getElementById('image').getAttribute('src') !== src",
        arg=before,
    )


def test_two_raters_rate_a_round_with_the_keyboard(browser, tmp_path: Path):
    bench = Workbench(tmp_path / "ratings.db", make_round(tmp_path, n=8), repeats=1)
    tokens = {name: bench.invite(name) for name in ("alice", "bob")}
    admin = bench.invite("lead", role="admin")
    shots = os.environ.get("MEDRL_WORKBENCH_SHOTS")
    clicked: dict[tuple[str, str], int] = {}  # (rater, item id) -> last rating pressed
    with Background(bench) as url:
        # no token: the page says how to get in, and the API refuses
        stranger = browser.new_context()
        page = stranger.new_page()
        page.goto(url + "/")
        page.wait_for_selector("#login:not([hidden])")
        assert "open the link" in page.inner_text("#login-message")
        assert stranger.request.get(url + "/api/state").status == 401
        stranger.close()

        contexts = {n: browser.new_context(viewport={"width": 1200, "height": 760}) for n in tokens}
        pages = {}
        for name, ctx in contexts.items():
            pages[name] = ctx.new_page()
            pages[name].goto(f"{url}/#token={tokens[name]}")
            pages[name].wait_for_selector("#app:not([hidden])")
            assert "#token" not in pages[name].url  # the token leaves the address bar
            assert pages[name].inner_text("#progress") == "0 of 9 rated"
        total = 9
        # both rate at the same time, alternating keystrokes; bob reloads after 3
        for step in range(total):
            for name, page in pages.items():
                if name == "bob" and step == 3:
                    seen = item_id(page)
                    page.reload()
                    page.wait_for_selector("#app:not([hidden])")
                    assert page.inner_text("#progress") == "3 of 9 rated"
                    assert item_id(page) == seen  # resumes at the first unanswered
                rating = 1 + (step + (name == "bob")) % 3
                clicked[(name, item_id(page))] = rating
                press_and_wait(page, [str(rating), "Enter"], step)
        for page in pages.values():
            page.wait_for_selector("#done:not([hidden])")
        # alice goes back one (P) and changes her answer; the history keeps both
        alice = pages["alice"]
        alice.keyboard.press("p")
        alice.wait_for_selector("#app:not([hidden])")
        changed = item_id(alice)
        assert (
            alice.get_attribute(f"#rating-{clicked[('alice', changed)]}", "aria-checked") == "true"
        )
        new = 3 if clicked[("alice", changed)] != 3 else 1
        alice.keyboard.press(str(new))
        alice.keyboard.press("c")
        alice.keyboard.type("vessels too straight")
        alice.keyboard.press("Escape")
        if shots:
            Path(shots).mkdir(parents=True, exist_ok=True)
            alice.screenshot(path=str(Path(shots) / "workbench-rating.png"))
        alice.keyboard.press("Enter")
        alice.wait_for_selector("#done:not([hidden])")
        clicked[("alice", changed)] = new
        # skip: S moves on without storing anything
        bob = pages["bob"]
        bob.keyboard.press("ArrowLeft")
        bob.wait_for_selector("#app:not([hidden])")
        before = item_id(bob)
        bob.keyboard.press("s")
        expect(bob.locator("#image")).not_to_have_attribute("src", f"/image/{before}")
        # cross-rater: bob's cookie cannot fetch alice's image or answer for her
        stolen = contexts["bob"].request.get(f"{url}/image/{changed}")
        assert stolen.status == 403
        # the admin's progress page
        boss = browser.new_context(viewport={"width": 1000, "height": 700})
        page = boss.new_page()
        page.goto(f"{url}/admin#token={admin}")
        page.wait_for_selector("#progress-table")
        text = page.inner_text("#progress-table")
        assert "alice\t9\t9\t1" in text and "bob\t9\t9\t0" in text
        alpha = agreement_report(bench.round_ratings())["alpha_ordinal"]
        assert page.inner_text("#alpha") == f"{alpha:.3f}"
        if shots:
            page.screenshot(path=str(Path(shots) / "workbench-progress.png"), full_page=True)
        for ctx in [*contexts.values(), boss]:
            ctx.close()

    # the stored ratings are what was pressed: each rater's latest per image
    frame = read_ratings(bench.db)
    latest = frame.drop_duplicates(["image_path", "rater_id"], keep="last")
    changed_original = bench._entry(Rater("alice", "rater"), changed)["repeat_of"] is None
    assert len(frame) == 2 * 8 + changed_original and len(latest) == 2 * 8
    got = {(r.rater_id, r.image_path): int(r.rating) for r in latest.itertuples()}
    want: dict[tuple[str, str], int] = {}
    for (name, iid), rating in clicked.items():
        entry = bench._entry(Rater(name, "rater"), iid)
        if entry["repeat_of"] is None:
            path = (bench.round_dir / entry["image"]).relative_to(tmp_path).as_posix()
            want[(name, path)] = rating
    assert got == want
    # and the CS787 export ingests back unchanged
    fresh = tmp_path / "fresh.db"
    ingest_ratings(export_ratings(bench.db, tmp_path / "export.csv"), fresh)
    cols = ["image_path", "rating", "rater_id", "timestamp", "generator_ckpt", "seed", "round"]
    assert read_ratings(fresh)[cols].astype(str).equals(frame[cols].astype(str))


def test_aspects_protocol_and_zoom_with_the_keyboard(browser, tmp_path: Path):
    bench = Workbench(tmp_path / "ratings.db", make_round(tmp_path, n=2), protocol="aspects",
                      repeats=0)  # fmt: skip
    token = bench.invite("alice")
    with Background(bench) as url:
        ctx = browser.new_context(viewport={"width": 1200, "height": 900})
        page = ctx.new_page()
        page.goto(f"{url}/#token={token}")
        page.wait_for_selector("#app:not([hidden])")
        assert page.locator("#aspects .aspect").count() == 6
        assert "Prompt-to-Polyp" in page.inner_text("#protocol")
        expect(page.locator("#image")).not_to_have_class(re.compile("zoom"))
        page.keyboard.press("z")
        expect(page.locator("#image")).to_have_class(re.compile("zoom"))
        page.keyboard.press("2")
        page.keyboard.press("Enter")  # aspects missing: refused in the page, nothing sent
        expect(page.locator("#status")).to_have_class("bad")
        assert page.inner_text("#progress") == "0 of 2 rated"
        page.locator("#aspects input").first.focus()
        for value in ["7", "8", "6.5", "9", "5", "10"]:
            page.keyboard.type(value)
            page.keyboard.press("Tab")
        page.locator("#aspect-confidence_of_use").press("Enter")
        expect(page.locator("#progress")).to_have_text("1 of 2 rated")
        ctx.close()
    row = read_ratings(bench.db).iloc[0]
    assert int(row["rating"]) == 2
    assert [row[a] for a in ("clinical_realism", "prompt_faithfulness",
                             "abnormality_detectability", "colour_contrast",
                             "intra_set_diversity", "confidence_of_use")] == [7, 8, 6.5, 9, 5, 10]  # fmt: skip
