"""`cones app` in a real browser: headless Chromium (Debian's) driven by Playwright against the page on a
loopback port, on the embedded model.

One server and one browser for the module; the steps run in order: upload reference pictures, run a
short search and see its progress, download the concept and load it, generate with two concepts, look
inside, cancel a search leaving nothing written, and bad input shown as the command line's one line.
A screenshot of each tab is kept in $CONES_ARTIFACTS (default: the test's temporary folder).

Skipped when Gradio, Playwright or Chromium is missing, unless CONES_REQUIRE_BROWSER=1 (as in .ci/run),
where a missing piece fails.
"""

from __future__ import annotations

import os
import shutil
import socket

import pytest
import torch

REQUIRED = os.environ.get("CONES_REQUIRE_BROWSER") == "1"


def _chromium() -> str | None:
    for path in ("/usr/lib/chromium/chromium", shutil.which("chromium"), shutil.which("chromium-browser")):
        if path and os.path.exists(path):
            return path
    return None


def _missing() -> str | None:
    try:
        import gradio  # noqa: F401
        import playwright.sync_api  # noqa: F401
    except ImportError as e:
        return f"needs the app extra and Playwright ({e.name} missing)"
    if _chromium() is None:
        return "needs Debian's chromium (apt-get install chromium)"
    return None


MISSING = _missing()
if MISSING and REQUIRED:
    raise RuntimeError(f"CONES_REQUIRE_BROWSER=1 but the browser test {MISSING}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=MISSING or "")]

TIMEOUT_MS = 240_000  # a search or a grid on 2 shared cores


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    folder = os.environ.get("CONES_ARTIFACTS") or str(tmp_path_factory.mktemp("artifacts"))
    os.makedirs(folder, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from cones.app import serve
    from cones.app.work import Studio

    workdir = str(tmp_path_factory.mktemp("app"))
    studio = Studio.open(workdir=workdir)
    port = _free_port()
    app = serve(studio, port=port, block=False)
    yield studio, f"http://127.0.0.1:{port}/"
    app.close()


@pytest.fixture(scope="module")
def page(server):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=_chromium(), headless=True, args=["--no-sandbox"])
        context = browser.new_context(viewport={"width": 1280, "height": 900}, accept_downloads=True)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.goto(server[1])
        page.locator("#find-run").wait_for()
        yield page
        context.close()
        browser.close()


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """The embedded world's smiling star: five reference renders as PNG files, as a user would upload."""
    from cones_world.concepts import references
    from cones_world.subjects import SUBJECTS

    folder = tmp_path_factory.mktemp("photos")
    paths = []
    for i, picture in enumerate(references(SUBJECTS["smiling-star"])[1]):
        path = str(folder / f"star-{i}.png")
        picture.save(path)
        paths.append(path)
    return paths


def field(page, elem_id: str):
    return page.locator(f"#{elem_id} textarea, #{elem_id} input").first


def tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def status_text(page, elem_id: str) -> str:
    return page.locator(f"#{elem_id}").inner_text()


def wait_for_status(page, elem_id: str, text: str) -> str:
    page.locator(f"#{elem_id}").get_by_text(text, exact=False).first.wait_for(timeout=TIMEOUT_MS)
    return status_text(page, elem_id)


def upload(page, elem_id: str, paths) -> None:
    page.locator(f"#{elem_id} input[type=file]").set_input_files(paths)
    stem = os.path.splitext(os.path.basename(paths[-1] if isinstance(paths, list) else paths))[0]
    page.locator(f"#{elem_id}").get_by_text(stem, exact=False).first.wait_for()  # stem and suffix shown apart


def clear_upload(page, elem_id: str) -> None:
    button = page.locator(f"#{elem_id} button[aria-label='Clear']")
    if button.count():
        button.first.click()


def fill_search(page, *, token="sks", class_word="star", steps=30, class_images=2, sparsity=0.05):
    field(page, "find-token").fill(token)
    field(page, "find-class").fill(class_word)
    field(page, "find-steps").fill(str(steps))
    field(page, "find-class-images").fill(str(class_images))
    field(page, "find-sparsity").fill(str(sparsity))


def test_find_shows_progress_and_gives_a_concept_that_loads(page, server, pictures, artifacts, tmp_path):
    from cones.storage import load_concept_file

    studio, _ = server
    # 1. upload the reference pictures
    upload(page, "find-files", pictures)
    # 2. a short search
    fill_search(page)
    page.locator("#find-run").click()
    # 3. its progress: the step and the loss, while it runs
    seen = wait_for_status(page, "find-status", "Searching: step")
    assert "loss" in seen
    done = wait_for_status(page, "find-status", "Found")
    assert "concept neurons" in done and "Traceback" not in done
    page.locator("#find-grid img").first.wait_for()
    page.screenshot(path=os.path.join(artifacts, "app-find.png"), full_page=True)
    # 4. download the concept; it loads and fits the model
    link = page.locator("#find-concept a").first
    with page.expect_download() as download:
        link.click()
    path = str(tmp_path / "downloaded.cones")
    download.value.save_as(path)
    concept = load_concept_file(path)
    concept.check_compatible(studio.pipe.unet)
    assert concept.token == "sks" and concept.class_word == "star" and concept.num_neurons > 0
    assert studio.concepts() == ["sks"]


def test_generate_with_two_concepts(page, server, artifacts, tmp_path):
    from cones.neurons import ConceptNeurons
    from cones.targets import target_parameters

    studio, _ = server
    # a second concept, brought as a file: 1% of the cross-attention K/V, token xqz
    generator = torch.Generator().manual_seed(0)
    params = target_parameters(studio.pipe.unet, "cross")
    mask = {n: torch.rand(p.shape, generator=generator) < 0.01 for n, p in params.items()}
    second = str(tmp_path / "xqz.cones")
    ConceptNeurons.from_mask(mask, token="xqz", class_word="circle").save(second)

    tab(page, "Generate")
    page.locator("#generate-upload input[type=file]").set_input_files(second)
    wait_for_status(page, "generate-status", "Loaded")
    boxes = page.locator("#generate-concepts")
    boxes.get_by_label("sks").check()
    boxes.get_by_label("xqz").check()
    field(page, "generate-prompt").fill("a sks star on a sea background")
    field(page, "generate-seeds").fill("0 1 2")
    field(page, "generate-steps").fill("10")
    page.locator("#generate-run").click()
    text = wait_for_status(page, "generate-status", "Generated")
    assert "sks" in text and "xqz" in text
    page.locator("#generate-grid img").first.wait_for()
    page.screenshot(path=os.path.join(artifacts, "app-generate.png"), full_page=True)
    assert studio.concepts() == ["sks", "xqz"]
    from cones.loaders import active_concepts

    assert active_concepts(studio.pipe) == []  # switched per request, back to the base model after it


def test_inside_shows_the_maps(page, artifacts):
    tab(page, "Inside")
    assert field(page, "inside-concept").input_value() == "xqz"  # the latest concept loaded is chosen
    field(page, "inside-concept").click()
    page.get_by_role("option", name="sks", exact=True).click()  # the one the search found
    field(page, "inside-prompt").fill("a sks star")
    page.locator("#inside-run").click()
    wait_for_status(page, "inside-status", "Before and after shutting sks")
    page.locator("#inside-grid img").first.wait_for()
    page.screenshot(path=os.path.join(artifacts, "app-inside.png"), full_page=True)


def test_cancel_leaves_nothing_written(page, server, pictures):
    studio, _ = server
    before = sorted(os.listdir(studio.workdir))
    tab(page, "Find")
    fill_search(page, token="vlt", steps=100_000)
    page.locator("#find-run").click()
    wait_for_status(page, "find-status", "Searching: step")
    page.locator("#find-cancel").click()
    wait_for_status(page, "find-status", "Cancelled: nothing was written")
    assert sorted(os.listdir(studio.workdir)) == before
    assert "vlt" not in studio.concepts()


BAD = [
    ("unreadable", "cannot read broken.png as an image"),
    ("no-images", "no reference images given"),
    ("multi-token", "tokens for this model's tokenizer; pick a rare word that is one token"),
    ("other-model", "the concept was made for another base model"),
]


@pytest.mark.parametrize("case, message", BAD, ids=[c for c, _ in BAD])
def test_bad_input_is_one_line_in_the_page(page, pictures, tmp_path, artifacts, case, message):
    from cones.neurons import ConceptNeurons

    if case == "other-model":
        tab(page, "Generate")
        foreign = str(tmp_path / "foreign.cones")
        ConceptNeurons(
            {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": [0]},
            {"down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight": (320, 768)},
            token="zrb",
        ).save(foreign)
        clear_upload(page, "generate-upload")  # the concept loaded before is still shown there
        page.locator("#generate-upload input[type=file]").set_input_files(foreign)
        text = wait_for_status(page, "generate-status", message)
        element = "generate-status"
    else:
        tab(page, "Find")
        clear_upload(page, "find-files")
        fill_search(page, token="xqz xqz" if case == "multi-token" else "sks")
        if case == "unreadable":
            broken = tmp_path / "broken.png"
            broken.write_bytes(b"not a picture at all")
            upload(page, "find-files", [str(broken)])
        elif case == "multi-token":
            upload(page, "find-files", pictures)
        page.locator("#find-run").click()
        text = wait_for_status(page, "find-status", message)
        element = "find-status"
    lines = [line for line in text.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), text
    assert "Traceback" not in page.content()
    if case == "unreadable":
        page.locator(f"#{element}").screenshot(path=os.path.join(artifacts, "app-bad-upload.png"))
