"""demo/app.py served for real on 127.0.0.1: its API through gradio_client, 8 concurrent requests, broken uploads,
and the page in headless Chromium (Debian's `chromium`, driven by Playwright; no browser is downloaded).

One server (a tiny model) serves the whole module. In CI (CI=true) the browser test fails instead of skipping when
Chromium or Playwright is missing.
"""

import importlib.util
import os
import re
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image

from conftest import REPO_ROOT, _nyu_sample_path
from test_point_cloud import _read_ply
from tiny_models import save_tiny_checkpoint

IN_CI = os.environ.get("CI", "").lower() == "true"
CHROMIUM = os.environ.get("MOA_DEPTHCLIP_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--no-first-run",
]  # fmt: skip
MAX_QUEUE = 16


def _require(module: str):
    """Import `module`; in CI its absence is a failure (the test extra installs it), elsewhere a skip."""
    if IN_CI:
        return importlib.import_module(module)
    return pytest.importorskip(module, reason=f"{module} is in the test extra: pip install -e '.[test]'")


gr = _require("gradio")
gradio_client = _require("gradio_client")


def load_app():
    spec = importlib.util.spec_from_file_location("moa_depthclip_demo_app", REPO_ROOT / "demo" / "app.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # Gradio looks up where the page's component classes are defined
    spec.loader.exec_module(module)
    return module


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def app():
    return load_app()


@pytest.fixture(scope="module")
def server(app, tmp_path_factory):
    from modeling_moa_depthclip.cli.predict import load_depth_pipeline

    folder = tmp_path_factory.mktemp("demo_model")
    save_tiny_checkpoint(folder)
    depth_pipeline = load_depth_pipeline(str(folder), "cpu")
    nyu = _nyu_sample_path()
    page = app.DepthDemo(depth_pipeline, "tiny-test-model", nyu if nyu.is_dir() else None)
    blocks = page.build()
    port = _free_port()
    app.serve(blocks, "127.0.0.1", port, max_queue=MAX_QUEUE, block=False)
    try:
        yield {"url": f"http://127.0.0.1:{port}/", "blocks": blocks, "page": page, "pipeline": depth_pipeline}
    finally:
        blocks.close()


@pytest.fixture(scope="module")
def client(server):
    return gradio_client.Client(server["url"], verbose=False)


def _check_outputs(result, expected_depth: np.ndarray):
    figure, slider, low, median, high, png, npy, ply, view, notes = result[:10]
    height, width = expected_depth.shape
    depth = np.load(npy)
    assert depth.dtype == np.float32 and depth.shape == (height, width)
    np.testing.assert_allclose(depth, expected_depth, rtol=1e-5, atol=1e-6)  # the model's own prediction
    millimetres = np.asarray(Image.open(png))
    assert millimetres.dtype == np.uint16 and millimetres.shape == (height, width)
    np.testing.assert_array_equal(millimetres, np.rint(depth * 1000).astype(np.uint16))
    assert (low, median, high) == pytest.approx(
        (depth.min(), np.median(depth), depth.max()), abs=5e-4
    )  # fmt: skip
    _, records = _read_ply(ply)
    assert len(records) == height * width
    np.testing.assert_array_equal(np.sort(records["z"]), np.sort(depth.ravel()))
    picture = Image.open(figure)
    assert picture.height == height and picture.width > width  # the map and its colour bar
    assert "points" in notes and f"{width}x{height}" in notes
    _, preview = _read_ply(view)  # the 3D view: fewer points, in the viewer's axes (y up, the scene at -z)
    assert 0 < len(preview) <= len(records) and (preview["z"] < 0).all()
    assert -preview["z"].min() == pytest.approx(depth.max(), rel=0.05)
    return depth


def test_one_named_endpoint_takes_the_image_first(client):
    api = client.view_api(print_info=False, return_format="dict")
    assert list(api["named_endpoints"]) == ["/predict"]
    parameters = api["named_endpoints"]["/predict"]["parameters"]
    assert parameters[0]["parameter_name"] == "image_path" and parameters[0]["component"] == "Image"
    assert [p["parameter_name"] for p in parameters[1:]] == ["camera", "fov_deg"]


def test_client_gets_the_depth_files_of_a_real_nyu_frame(server, client, nyu_sample_dir):
    frame = nyu_sample_dir / "00008_colors.png"
    expected = server["pipeline"](Image.open(frame).convert("RGB"))["metric_depth"]
    result = client.predict(gradio_client.handle_file(str(frame)), "nyu", 60.0, api_name="/predict")
    depth = _check_outputs(result, expected)
    _, records = _read_ply(result[7])
    # the NYU camera was used: x = (u + 1 - cx) z / fx with NYU's published (1-based) principal point
    from modeling_moa_depthclip.geometry.point_cloud import NYU_INTRINSICS

    u = np.tile(np.arange(640), 480)
    np.testing.assert_allclose(records["x"], (u - NYU_INTRINSICS.cx) * depth.ravel() / NYU_INTRINSICS.fx, atol=1e-5)
    assert "fx=518.9" in result[9]


def test_client_gets_the_uncertainty_after_the_depth_outputs(server, client, nyu_sample_dir):
    frame = nyu_sample_dir / "00008_colors.png"
    expected = server["pipeline"](Image.open(frame).convert("RGB"))["uncertainty"]
    result = client.predict(gradio_client.handle_file(str(frame)), "nyu", 60.0, api_name="/predict")
    assert len(result) == 12  # the ten depth outputs stay first
    figure, npy = result[10:]
    np.testing.assert_allclose(np.load(npy), expected, rtol=1e-5, atol=1e-6)
    picture = Image.open(figure)
    assert picture.height == 480 and picture.width > 640  # the map and its colour bar in metres


def test_an_uploaded_photo_keeps_its_exif_focal_length(client, tmp_path):
    exif = Image.Exif()
    exif.get_ifd(0x8769)[0xA405] = 26  # FocalLengthIn35mmFilm
    photo = tmp_path / "phone.jpg"
    Image.new("RGB", (96, 72), (120, 90, 60)).save(photo, exif=exif)
    notes = client.predict(gradio_client.handle_file(str(photo)), "auto", 60.0, api_name="/predict")[9]
    assert "96x72 px" in notes and "EXIF 35 mm-equivalent focal length 26 mm" in notes
    notes = client.predict(gradio_client.handle_file(str(photo)), "fov", 90.0, api_name="/predict")[9]
    assert "horizontal field of view 90 deg" in notes


def test_broken_uploads_are_errors_and_the_server_goes_on(server, client, nyu_sample_dir, tmp_path):
    garbage = tmp_path / "holiday.png"
    garbage.write_bytes(b"this is not an image at all")
    truncated = tmp_path / "cut.png"
    truncated.write_bytes((nyu_sample_dir / "00000_colors.png").read_bytes()[:5000])
    for path, message in [(garbage, "holiday.png: not a readable image"), (truncated, "cut.png: truncated")]:
        with pytest.raises(gradio_client.exceptions.AppError, match=message):
            client.predict(gradio_client.handle_file(str(path)), "auto", 60.0, api_name="/predict")
    with pytest.raises(gradio_client.exceptions.AppError, match="kinect.*not in the list of choices"):
        client.predict(gradio_client.handle_file(str(nyu_sample_dir / "00000_colors.png")), "kinect", 60.0,
                       api_name="/predict")  # fmt: skip
    frame = nyu_sample_dir / "00000_colors.png"
    expected = server["pipeline"](Image.open(frame).convert("RGB"))["metric_depth"]
    _check_outputs(client.predict(gradio_client.handle_file(str(frame)), api_name="/predict"), expected)


def test_eight_concurrent_requests_are_all_answered(server, nyu_sample_dir):
    frames = sorted(nyu_sample_dir.glob("*_colors.png"))[:8]
    expected = {f.name: server["pipeline"](Image.open(f).convert("RGB"))["metric_depth"] for f in frames}
    assert server["blocks"]._queue.max_size == MAX_QUEUE  # bounded: requests beyond it are refused

    def request(frame):
        client = gradio_client.Client(server["url"], verbose=False)  # one user each
        started = time.perf_counter()
        result = client.predict(gradio_client.handle_file(str(frame)), "auto", 60.0, api_name="/predict")
        return frame.name, result, time.perf_counter() - started

    with ThreadPoolExecutor(max_workers=8) as pool:
        answers = list(pool.map(request, frames))
    assert len(answers) == 8
    for name, result, _ in answers:
        _check_outputs(result, expected[name])


def test_depth_figure_and_click_readout(app):
    depth = np.linspace(1.0, 4.0, 48 * 64, dtype=np.float32).reshape(48, 64)
    figure = np.asarray(app.depth_figure(depth, 1.0, 4.0))
    from modeling_moa_depthclip.visualization import colorize_depth

    np.testing.assert_array_equal(figure[:, :64], np.asarray(colorize_depth(depth, 1.0, 4.0)))
    bar = figure[:, 64:]
    assert (bar != 255).any(axis=2).sum() > 0  # the colour bar and its labels are drawn
    event = gr.SelectData(None, {"index": [10, 20], "value": None})
    assert app.DepthDemo.depth_at(depth, event) == f"{depth[20, 10]:.3f} m at pixel x=10, y=20"
    assert "colour bar" in app.DepthDemo.depth_at(depth, gr.SelectData(None, {"index": [70, 5], "value": None}))
    assert "first" in app.DepthDemo.depth_at(None, event)


def test_the_script_needs_a_model(app, monkeypatch):
    monkeypatch.delenv(app.MODEL_ENV, raising=False)
    with pytest.raises(SystemExit, match="give --model"):
        app.main([])


# ---------------------------------------------------------------- a real browser


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError as error:
        if IN_CI:
            pytest.fail(f"Playwright is missing in CI ({error}); it is in the test extra")
        pytest.skip("Playwright is not installed (pip install -e '.[test]')")
    if not os.path.exists(CHROMIUM):
        message = f"no Chromium at {CHROMIUM} (apt-get install -y chromium)"
        pytest.fail(message) if IN_CI else pytest.skip(message)
    with sync_playwright() as playwright:
        try:
            chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        except Exception as error:
            message = f"Chromium at {CHROMIUM} does not start: {' '.join(str(error).split())[:300]}"
            pytest.fail(message) if IN_CI else pytest.skip(message)
        yield chromium
        chromium.close()


def test_page_in_chromium_uploads_reads_a_point_and_downloads_the_png(server, browser, nyu_sample_dir, tmp_path):
    page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
    started = time.perf_counter()
    page.goto(server["url"])
    page.wait_for_selector("#run", timeout=60_000)
    load_seconds = time.perf_counter() - started

    # a broken upload: the page shows the error, and goes on serving
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    page.set_input_files("#input-image input[type=file]", str(broken))
    page.get_by_text("broken.png: not a readable image").first.wait_for(timeout=60_000)

    frame = nyu_sample_dir / "00014_colors.png"
    page.set_input_files("#input-image input[type=file]", str(frame))
    started = time.perf_counter()
    _wait_for_result(page)
    image_seconds = time.perf_counter() - started

    # click pixel (200, 300) of the depth map: the picture is drawn scaled and centred in its box
    metres, px, py = _click_map(page, 200, 300)

    with page.expect_download(timeout=60_000) as download_info:
        page.click("#download-png")
    png_path = tmp_path / "downloaded_depth.png"
    download_info.value.save_as(png_path)
    millimetres = np.asarray(Image.open(png_path))
    assert millimetres.dtype == np.uint16 and millimetres.shape == (480, 640)
    assert millimetres[py, px] == pytest.approx(metres * 1000, abs=1)  # the page's reading is the file's value
    expected = server["pipeline"](Image.open(frame).convert("RGB"))["metric_depth"]
    np.testing.assert_array_equal(millimetres, np.rint(expected * 1000).astype(np.uint16))

    for name in ("min-depth", "median-depth", "max-depth"):
        assert float(page.locator(f"#{name} input").input_value()) > 0
    screenshot = tmp_path / "demo_page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    assert Image.open(screenshot).width == 1400
    page.close()
    print(f"page load {load_seconds:.2f} s, one 640x480 frame {image_seconds:.2f} s (tiny model), "
          f"screenshot {screenshot}")  # fmt: skip


# what the page draws over or next to the depth map at phone width: nothing may overlap the map itself
OVERLAPS_JS = """
() => {
  const picture = document.querySelector('#depth-figure img');
  const map = picture.getBoundingClientRect();
  const component = document.querySelector('#depth-figure');
  const visible = (el) => {
    const style = getComputedStyle(el), r = el.getBoundingClientRect();
    return r.width > 0 && r.height > 0 && style.visibility !== 'hidden' && style.display !== 'none'
      && parseFloat(style.opacity) > 0;
  };
  const overlapping = [];
  for (const el of document.querySelectorAll('body *')) {
    if (el === picture || el.contains(picture) || !visible(el)) continue;
    // inside the image component only its own chrome counts (label, buttons); its frames hold the picture
    if (component.contains(el) && !el.matches('label, button, [data-testid="block-label"], .icon-button-wrapper'))
      continue;
    const r = el.getBoundingClientRect();
    const x = Math.min(r.right, map.right) - Math.max(r.left, map.left);
    const y = Math.min(r.bottom, map.bottom) - Math.max(r.top, map.top);
    if (x > 1 && y > 1) overlapping.push(`${el.tagName.toLowerCase()}#${el.id}.${el.className}`.slice(0, 120));
  }
  return {map: [map.left, map.top, map.width, map.height], overlapping,
          pageWidth: document.documentElement.scrollWidth};
}
"""


def _wait_for_result(page):
    """Until the run's notes (written last, with every output) are on the page."""
    page.wait_for_function("() => document.querySelector('#notes textarea').value.includes(' points')",
                           timeout=60_000)  # fmt: skip
    page.locator("#depth-figure img").wait_for(timeout=60_000)


def _reading(page) -> str:
    return page.locator("#clicked-depth textarea").input_value()


def _click_map(page, x: int, y: int):
    picture = page.locator("#depth-figure img")
    picture.scroll_into_view_if_needed()  # the mouse clicks inside the viewport only
    geometry = picture.evaluate(
        "img => { const r = img.getBoundingClientRect(); return [r.x, r.y, r.width, r.height, img.naturalWidth,"
        " img.naturalHeight]; }"
    )
    left, top, box_width, box_height, natural_width, natural_height = geometry
    scale = min(box_width / natural_width, box_height / natural_height)
    left += (box_width - natural_width * scale) / 2
    top += (box_height - natural_height * scale) / 2
    page.mouse.click(left + (x + 0.5) * scale, top + (y + 0.5) * scale)
    page.wait_for_function("() => document.querySelector('#clicked-depth textarea').value.includes(' m at pixel')")
    match = re.fullmatch(r"(\d+\.\d{3}) m at pixel x=(\d+), y=(\d+)", _reading(page))
    assert match, _reading(page)
    px, py = int(match[2]), int(match[3])
    assert abs(px - x) <= 2 and abs(py - y) <= 2  # a screen pixel covers about two image pixels at this width
    return float(match[1]), px, py


def _read_point(page, depth, x, y):
    """Click the map near pixel (x, y) and check the reading is the depth there."""
    metres, px, py = _click_map(page, x, y)
    assert _reading(page) == f"{depth[py, px]:.3f} m at pixel x={px}, y={py}"
    return metres


def test_page_at_phone_width_examples_run_the_model_and_a_new_image_clears_the_reading(server, app, browser,
                                                                                       tmp_path):
    page = browser.new_page(viewport={"width": 420, "height": 900}, accept_downloads=True)
    page.goto(server["url"])
    page.wait_for_selector("#run", timeout=60_000)
    examples = {label: row[0] for row, label in server["page"].examples}
    expected = {label: server["pipeline"](path)["metric_depth"] for label, path in examples.items()
                if label.startswith("synthetic")}  # fmt: skip
    first, second = sorted(expected)

    # clicking an example runs the model, as an upload does: no button press
    page.get_by_text(first, exact=True).click()
    _wait_for_result(page)
    assert float(page.locator("#min-depth input").input_value()) == pytest.approx(expected[first].min(), abs=1e-3)
    _read_point(page, expected[first], 100, 80)

    # the layout holds at 420 px: nothing covers the map, nothing runs off the side of the page
    layout = page.evaluate(OVERLAPS_JS)
    screenshot = tmp_path / "demo_420px.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"screenshot at 420 px: {screenshot}; depth map at {layout['map']}")
    assert layout["overlapping"] == [], layout
    assert layout["pageWidth"] <= 420, layout
    assert layout["map"][2] > 200  # the map is drawn at a readable size

    # another example: the reading that belonged to the first image goes, then the second image's depth arrives
    page.get_by_text(second, exact=True).click()
    page.wait_for_function(f"() => document.querySelector('#clicked-depth textarea').value === {app.CLICK_PROMPT!r}",
                           timeout=60_000)  # fmt: skip
    page.wait_for_function(
        f"() => Math.abs(parseFloat(document.querySelector('#min-depth input').value) - {expected[second].min()})"
        " < 1e-3", timeout=60_000,
    )  # fmt: skip
    _read_point(page, expected[second], 100, 80)

    # the 3D tab offers the PLY of the image shown
    ply = _check_3d_tab(page, tmp_path, expected_webgl=None)
    _, records = _read_ply(ply)
    height, width = expected[second].shape
    assert len(records) == height * width
    np.testing.assert_allclose(np.sort(records["z"]), np.sort(expected[second].ravel()), rtol=1e-5)
    page.close()


def _check_3d_tab(page, tmp_path, expected_webgl):
    """Open the 3D tab: the viewer where the browser has WebGL; a notice, and no blank viewer, where it has not.
    Either way the tab's button downloads the PLY; returns its path."""
    page.get_by_role("tab", name="3D", exact=True).click()
    webgl = page.evaluate(
        "() => { const c = document.createElement('canvas'); return !!(c.getContext('webgl2') || c.getContext('webgl')); }"
    )
    if expected_webgl is not None:
        assert webgl == expected_webgl
    notice = page.locator("#webgl-notice .no-webgl")
    if webgl:
        assert notice.is_hidden() and page.locator("#point-cloud-view").is_visible()
        page.locator("#point-cloud-view canvas").wait_for(timeout=60_000)  # the viewer draws (software WebGL too)
        page.wait_for_timeout(3000)  # for the screenshot: the points take a moment to appear
    else:
        notice.wait_for(state="visible", timeout=10_000)
        assert "no WebGL" in notice.inner_text() and "PLY" in notice.inner_text()
        assert page.locator("#point-cloud-view").is_hidden()
    screenshot = tmp_path / f"demo_3d_tab_webgl_{'on' if webgl else 'off'}.png"
    page.screenshot(path=str(screenshot), full_page=True)
    print(f"3D tab, WebGL {'available' if webgl else 'missing'}: {screenshot}")
    with page.expect_download(timeout=60_000) as download_info:
        page.click("#download-ply-3d")
    ply = tmp_path / f"points_webgl_{'on' if webgl else 'off'}.ply"
    download_info.value.save_as(ply)
    return ply


def test_without_webgl_the_3d_tab_says_so_and_offers_the_ply(server, browser, tmp_path):
    # WebGL switched off, as on machines and headless browsers without a GPU or software fallback
    no_webgl = browser.browser_type.launch(executable_path=CHROMIUM, args=[*CHROMIUM_ARGS, "--disable-3d-apis"])
    try:
        page = no_webgl.new_page(viewport={"width": 420, "height": 900}, accept_downloads=True)
        page.goto(server["url"])
        page.wait_for_selector("#run", timeout=60_000)
        label, path = next((label, row[0]) for row, label in server["page"].examples if label.startswith("synthetic"))
        page.get_by_text(label, exact=True).click()
        _wait_for_result(page)
        ply = _check_3d_tab(page, tmp_path, expected_webgl=False)
        _, records = _read_ply(ply)
        expected = server["pipeline"](path)["metric_depth"]
        np.testing.assert_allclose(np.sort(records["z"]), np.sort(expected.ravel()), rtol=1e-5)
    finally:
        no_webgl.close()


def test_page_in_chromium_shows_the_uncertainty_and_reads_a_point(server, browser, nyu_sample_dir):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.goto(server["url"])
    page.wait_for_selector("#run", timeout=60_000)
    frame = nyu_sample_dir / "00014_colors.png"
    page.set_input_files("#input-image input[type=file]", str(frame))
    page.locator("#depth-figure img").wait_for(timeout=60_000)
    page.get_by_role("tab", name="Uncertainty").click()
    picture = page.locator("#uncertainty-figure img")
    picture.wait_for(timeout=60_000)
    geometry = picture.evaluate(
        "img => { const r = img.getBoundingClientRect(); return [r.x, r.y, r.width, r.height, img.naturalWidth,"
        " img.naturalHeight]; }"
    )
    x, y, box_width, box_height, natural_width, natural_height = geometry
    scale = min(box_width / natural_width, box_height / natural_height)
    left = x + (box_width - natural_width * scale) / 2
    top = y + (box_height - natural_height * scale) / 2
    page.mouse.click(left + 120.5 * scale, top + 200.5 * scale)
    page.wait_for_function("() => document.querySelector('#clicked-uncertainty textarea').value.includes('at pixel')")
    text = page.locator("#clicked-uncertainty textarea").input_value()
    match = re.fullmatch(r"±(\d+\.\d{3}) m \(depth (\d+\.\d{3}) m\) at pixel x=(\d+), y=(\d+)", text)
    assert match, text
    px, py = int(match[3]), int(match[4])
    assert abs(px - 120) <= 2 and abs(py - 200) <= 2
    expected = server["pipeline"](Image.open(frame).convert("RGB"))
    assert float(match[1]) == pytest.approx(expected["uncertainty"][py, px], abs=1e-3)  # the page's reading is the map's
    assert float(match[2]) == pytest.approx(expected["metric_depth"][py, px], abs=1e-3)
    page.close()
