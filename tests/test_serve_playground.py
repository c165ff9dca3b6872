"""The playground page of `peftkit serve` (src/peftkit/serve/static/playground.html) in a real headless Chromium.

A real server (``serve_util.running_server``: the app under uvicorn on 127.0.0.1, a free port) serves the bundled
model and two adapters of different methods with non-zero weights (LoRA and prompt tuning). Chromium (the Debian
package, /usr/bin/chromium; never a downloaded browser) is driven by Playwright: the page must stream the three
completions side by side, each equal to the server's own non-streamed greedy completion fetched with the `openai`
client, and a screenshot must show the three columns with text in them; Stop must abort the streams (and the
server keep serving). A second server with an API key checks that a wrong key shows the 401 message, in the
model list and in each column. Skipped when Chromium or Playwright is missing.
"""

from __future__ import annotations

import io
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.is_file():
    pytest.skip(f"no Chromium at {CHROMIUM} (Debian: apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright for Python is not installed "
                                                             "(pip install playwright==1.65.2)")
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from PIL import Image  # noqa: E402

from peftkit.serve.server import ServeOptions  # noqa: E402

from .serve_util import make_adapters, running_server  # noqa: E402

pytestmark = pytest.mark.slow

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 800}
PROMPT = "Once upon a time"
MAX_TOKENS = 24
KEY = "sk-playground-test"


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, str]:
    """Two adapter folders on the bundled model, a LoRA and a prompt tuning one: {name: folder}."""
    return make_adapters(tmp_path_factory.mktemp("playground_adapters"), 2, kinds=["lora", "prompt"])


def _options(adapters: dict[str, str], api_key: str | None) -> ServeOptions:
    return ServeOptions(adapters=list(adapters.items()), api_key=api_key)


@pytest.fixture(scope="module")
def server(adapters):
    """(the server's root URL, the base model's id)."""
    with running_server(_options(adapters, api_key=None)) as (url, served):
        yield url.removesuffix("/v1"), served.base_name


@pytest.fixture(scope="module")
def keyed_server(adapters):
    with running_server(_options(adapters, api_key=KEY)) as (url, served):
        yield url.removesuffix("/v1"), served.base_name


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport=VIEWPORT, device_scale_factor=1)
    page = context.new_page()
    yield page
    context.close()


def _columns(page) -> list[dict]:
    """What each output column shows: model, state, box (its place on the page), text, stats and error."""
    return page.eval_on_selector_all("#outputs .column", """columns => columns.map(c => ({
        model: c.dataset.model, state: c.dataset.state, box: c.getBoundingClientRect().toJSON(),
        text: c.querySelector('.column-text').textContent, stats: c.querySelector('.column-stats').textContent,
        error: c.querySelector('.column-error').hidden ? null : c.querySelector('.column-error').textContent}))""")


def _ink(image, box: dict) -> int:
    """Pixels darker than mid-grey inside ``box`` (CSS pixels, device scale 1) of a screenshot: rendered text."""
    region = image.convert("L").crop((int(box["x"]), int(box["y"]), int(box["x"] + box["width"]),
                                      int(box["y"] + box["height"])))
    return sum(region.histogram()[:128])


def test_playground_streams_three_models_side_by_side(server, adapters, page):
    url, base = server
    page.goto(url + "/")
    boxes = page.locator("#model-list input[name=model]")
    boxes.first.wait_for()
    assert boxes.count() == 3
    assert boxes.first.get_attribute("value") == base  # the base first
    models = [base, *adapters]

    page.check(f'#model-list input[value="{base}"]')
    page.click("#generate")  # one model ticked: not enough
    assert "two or more" in page.text_content("#message")
    assert page.locator("#outputs .column").count() == 0

    for model in models[1:]:
        page.check(f'#model-list input[value="{model}"]')
    page.fill("#prompt", PROMPT)
    page.fill("#max-tokens", str(MAX_TOKENS))
    page.fill("#temperature", "0")
    page.click("#generate")
    page.wait_for_function("""() => { const c = [...document.querySelectorAll('#outputs .column')];
        return c.length === 3 && c.every(x => x.dataset.state !== 'streaming'); }""", timeout=120_000)
    columns = _columns(page)

    assert [c["model"] for c in columns] == models
    assert [c["state"] for c in columns] == ["done"] * 3, columns
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)
    for column in columns:
        reference = client.completions.create(model=column["model"], prompt=PROMPT, max_tokens=MAX_TOKENS,
                                              temperature=0)
        assert column["text"] == reference.choices[0].text, column["model"]
        assert column["text"].strip(), column["model"]
        assert column["stats"].startswith("first token ") and column["stats"].endswith(" tokens/s"), column["stats"]
        assert f" · {reference.usage.completion_tokens} tokens · " in column["stats"], column["stats"]
    assert len({c["text"] for c in columns}) == 3, "the adapters must change the output"
    assert page.text_content("#message") == "Done."

    image = Image.open(io.BytesIO(page.screenshot()))
    assert image.format == "PNG" and image.size == (VIEWPORT["width"], VIEWPORT["height"])
    boxes = [c["box"] for c in columns]
    for left, right in zip(boxes, boxes[1:]):  # side by side: one row, left to right, not overlapping
        assert left["y"] == right["y"] and left["x"] + left["width"] <= right["x"]
    for column, box in zip(columns, boxes):
        assert box["x"] >= 0 and box["y"] >= 0
        assert box["x"] + box["width"] <= VIEWPORT["width"] and box["y"] + box["height"] <= VIEWPORT["height"]
        text_box = page.locator(f'#outputs .column[data-model="{column["model"]}"] .column-text').bounding_box()
        assert _ink(image, text_box) > 100, f"no text drawn in the column of {column['model']}"
    blank = {"x": 0, "y": boxes[0]["y"] + boxes[0]["height"] + 8, "width": VIEWPORT["width"], "height": 8}
    assert _ink(image, blank) == 0  # below the columns the page is blank: the ink above is the columns'


def test_playground_stop_aborts_the_streams(server, adapters, page):
    url, base = server
    page.goto(url + "/")
    page.locator("#model-list input[name=model]").first.wait_for()
    models = [base, *adapters]
    for model in models:
        page.check(f'#model-list input[value="{model}"]')
    page.fill("#max-tokens", "400")  # far more than arrives before Stop (the bundled model's context is 512)
    page.click("#generate")
    page.wait_for_function("""() => { const c = [...document.querySelectorAll('#outputs .column-text')];
        return c.length === 3 && c.every(x => x.textContent.length > 0); }""", timeout=120_000)
    page.click("#stop")
    page.wait_for_function("() => document.getElementById('outputs').dataset.running === 'false'", timeout=30_000)
    columns = _columns(page)
    assert [c["state"] for c in columns] == ["stopped"] * 3, columns
    assert all(c["error"] is None and c["text"] for c in columns)
    assert page.text_content("#message") == "Stopped."
    assert page.is_enabled("#generate") and page.is_disabled("#stop")
    # the server keeps serving after the browser dropped three streams
    reply = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0).completions.create(
        model=models[1], prompt=PROMPT, max_tokens=4, temperature=0)
    assert reply.usage.completion_tokens == 4


def test_playground_wrong_api_key_shows_the_401_message(keyed_server, adapters, page):
    url, base = keyed_server
    with pytest.raises(openai.AuthenticationError) as caught:
        openai.OpenAI(base_url=url + "/v1", api_key="sk-wrong", max_retries=0).models.list()
    message = caught.value.body["message"]  # the server's {"error": {"message", ...}}
    assert message

    page.goto(url + "/")
    page.fill("#api-key", "sk-wrong")
    with page.expect_response(lambda r: r.url.endswith("/v1/models")
                              and r.request.headers.get("authorization") == "Bearer sk-wrong") as response:
        page.press("#api-key", "Enter")
    assert response.value.status == 401
    page.wait_for_function("""m => document.getElementById('models-status').textContent.includes(m)""",
                           arg=message, timeout=30_000)
    assert page.locator("#model-list input[name=model]").count() == 0

    page.fill("#api-key", KEY)  # the right key lists the models again
    page.press("#api-key", "Enter")
    page.wait_for_function("() => document.getElementById('models-status').textContent === '3 models'",
                           timeout=30_000)
    assert page.locator("#model-list input[name=model]").count() == 3

    # a key gone wrong after the list loaded: each column shows the 401 of its own request
    models = [base, next(iter(adapters))]
    for model in models:
        page.check(f'#model-list input[value="{model}"]')
    page.focus("#prompt")  # the key set from a script, not typed: no change event, so no reload of the list
    page.eval_on_selector("#api-key", "field => { field.value = 'sk-wrong'; }")
    page.click("#generate")
    page.wait_for_function("() => document.getElementById('message').textContent.startsWith('Done')",
                           timeout=30_000)
    columns = _columns(page)
    assert [c["model"] for c in columns] == models
    assert [(c["state"], c["error"], c["text"]) for c in columns] == [("error", message, "")] * 2
    assert page.text_content("#message") == "Done, 2 with an error."
