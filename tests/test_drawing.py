"""The round drawing (``faxbridge inspect PROGRAM --html FILE``) as a browser lays it out.

Every bundled example's page is written by the command line, opened in headless Chromium (Debian's
``chromium``; ``make chromium`` installs it) at 1280 and 1920 px, screenshotted, and measured from
the DOM after layout: no two text boxes overlap, no text runs out of the box that holds it or past
the window, and the page does not scroll sideways. Each page is measured as written (groups closed
where the drawing closes them) and with every ``<details>`` opened.

The browser is driven over the Chrome DevTools protocol on a pipe (``--remote-debugging-pipe``,
NUL-separated JSON), so one browser serves every page and no Python package is needed.

``python tests/test_drawing.py DIR`` writes the screenshots the docs show (FedAvg, char_lm and
DP-FedAvg at 1280 px) into DIR.
"""

from __future__ import annotations

import base64
import contextlib
import fcntl
import importlib
import io
import itertools
import json
import os
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
WIDTHS = (1280, 1920)
EXAMPLES = sorted(p.stem for p in (REPO / "examples").glob("*.py") if not p.stem.startswith("_"))
DOCS_SHOTS = {"fedavg": "drawing_fedavg.png", "char_lm": "drawing_char_lm.png",
              "dp_fedavg": "drawing_dp_fedavg.png"}


# --- a browser over the DevTools protocol ------------------------------------------------------
def chromium_path() -> str:
  """Debian's ``chromium`` (``make chromium`` installs it); a missing browser fails the tests."""
  for name in ("chromium", "chromium-browser", "google-chrome"):
    path = shutil.which(name)
    if path:
      return path
  pytest.fail("no Chromium on PATH: the drawing is tested in a real browser. Install it with "
              "`make chromium` (Debian: apt-get install -y chromium)")


def _above(fd: int, lowest: int) -> int:
  moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, lowest)
  os.close(fd)
  return moved


class Browser:
  """One headless Chromium; :meth:`page` opens a tab in which :meth:`call` sends commands."""

  def __init__(self, path: str):
    to_browser, self._to_browser = os.pipe()
    self._from_browser, from_browser = os.pipe()
    # The child's ends move above fd 4, so that giving them the numbers 3 and 4 cannot clobber one.
    to_browser, from_browser = (_above(fd, 10) for fd in (to_browser, from_browser))
    self.profile = tempfile.mkdtemp(prefix="faxbridge-chromium-")
    args = [path, "--headless", "--remote-debugging-pipe", "--no-sandbox", "--disable-gpu",
            "--hide-scrollbars", "--no-first-run", "--no-default-browser-check",
            "--disable-extensions", "--mute-audio", f"--user-data-dir={self.profile}"]
    # The protocol pipe is the browser's fds 3 (commands in) and 4 (replies out).
    self.proc = subprocess.Popen(
        ["bash", "-c", f'exec "$@" 3<&{to_browser} 4>&{from_browser}', "bash", *args],
        pass_fds=(to_browser, from_browser), stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_browser)
    os.close(from_browser)
    self._ids = itertools.count(1)
    self._buffer = b""
    self.events: list[dict] = []
    self.session: str | None = None

  def _send(self, method: str, params: dict, session: str | None) -> int:
    msg_id = next(self._ids)
    msg = {"id": msg_id, "method": method, "params": params}
    if session:
      msg["sessionId"] = session
    os.write(self._to_browser, json.dumps(msg).encode() + b"\0")
    return msg_id

  def _read(self, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while b"\0" not in self._buffer:
      left = deadline - time.monotonic()
      if left <= 0 or not select.select([self._from_browser], [], [], left)[0]:
        raise TimeoutError(f"Chromium did not answer in {timeout} s")
      chunk = os.read(self._from_browser, 1 << 20)
      if not chunk:
        raise RuntimeError(f"Chromium exited (code {self.proc.poll()})")
      self._buffer += chunk
    raw, self._buffer = self._buffer.split(b"\0", 1)
    return json.loads(raw)

  def call(self, method: str, timeout: float = 30.0, session: str | None = "page", **params):
    msg_id = self._send(method, params, self.session if session == "page" else session)
    while True:
      msg = self._read(timeout)
      if msg.get("id") == msg_id:
        if "error" in msg:
          raise RuntimeError(f"{method}: {msg['error']}")
        return msg.get("result", {})
      self.events.append(msg)

  def wait_event(self, method: str, timeout: float = 30.0) -> dict:
    for i, msg in enumerate(self.events):
      if msg.get("method") == method:
        return self.events.pop(i)
    while True:
      msg = self._read(timeout)
      if msg.get("method") == method:
        return msg
      self.events.append(msg)

  def open_tab(self) -> None:
    target = self.call("Target.createTarget", session=None, url="about:blank")["targetId"]
    self.session = self.call("Target.attachToTarget", session=None, targetId=target,
                             flatten=True)["sessionId"]
    self.call("Page.enable")
    self.call("Runtime.enable")

  def load(self, path: Path, width: int, height: int = 900) -> None:
    self.call("Emulation.setDeviceMetricsOverride", width=width, height=height,
              deviceScaleFactor=1, mobile=False)
    self.events.clear()
    self.call("Page.navigate", url=path.resolve().as_uri())
    self.wait_event("Page.loadEventFired")

  def evaluate(self, expression: str):
    result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
    if "exceptionDetails" in result:
      raise RuntimeError(f"page script failed: {result['exceptionDetails']}")
    return result["result"].get("value")

  def screenshot(self, out: Path) -> tuple[int, int]:
    """The whole page as a PNG at ``out``; returns its (width, height) in pixels."""
    width, height = self.evaluate("[document.documentElement.scrollWidth, "
                                  "document.documentElement.scrollHeight]")
    data = self.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                     clip={"x": 0, "y": 0, "width": width, "height": height, "scale": 1})["data"]
    out.write_bytes(base64.b64decode(data))
    return width, height

  def close(self) -> None:
    with contextlib.suppress(Exception):
      self.call("Browser.close", session=None, timeout=5)
    with contextlib.suppress(subprocess.TimeoutExpired):
      self.proc.wait(timeout=5)
    if self.proc.poll() is None:
      self.proc.kill()
      self.proc.wait()
    os.close(self._to_browser)
    os.close(self._from_browser)
    shutil.rmtree(self.profile, ignore_errors=True)


# Every rendered text fragment (one rect per line of a text node) and the box of the nearest
# element that lays it out (not an inline one), in page coordinates.
MEASURE = r"""
(() => {
  const boxes = [];
  const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
  let node = 0;
  while (walker.nextNode()) {
    const text = walker.currentNode;
    // The contents of a closed <details> keep a layout but are not rendered: skip them.
    if (!text.data.trim() || !text.parentElement.checkVisibility({visibilityProperty: true}))
      continue;
    let holder = text.parentElement;
    while (holder && getComputedStyle(holder).display === 'inline') holder = holder.parentElement;
    const h = holder.getBoundingClientRect();
    const range = document.createRange();
    range.selectNodeContents(text);
    for (const r of range.getClientRects()) {
      if (r.width < 1 || r.height < 1) continue;
      boxes.push({node, text: text.data.trim().slice(0, 60),
                  x0: r.left + scrollX, y0: r.top + scrollY, x1: r.right + scrollX,
                  y1: r.bottom + scrollY,
                  holder: [h.left + scrollX, h.top + scrollY, h.right + scrollX, h.bottom + scrollY],
                  tag: holder.tagName + (holder.className ? '.' + holder.className : '')});
    }
    node++;
  }
  return {boxes, scrollWidth: document.documentElement.scrollWidth,
          width: document.documentElement.clientWidth,
          height: document.documentElement.scrollHeight};
})()
"""
OPEN_ALL = "document.querySelectorAll('details').forEach(d => d.open = true); true"


def layout_problems(measured: dict, slack: float = 1.0) -> list[str]:
  """What a person would see as broken: overlapping text, text out of its box or the window, a
  page that scrolls sideways."""
  problems = []
  width = measured["width"]
  if measured["scrollWidth"] > width:
    problems.append(f"the page scrolls sideways: {measured['scrollWidth']} px wide in a {width} "
                    "px window")
  boxes = measured["boxes"]
  for b in boxes:
    if b["x0"] < -slack or b["x1"] > width + slack:
      problems.append(f"{b['text']!r} is cut off by the window ({b['x0']:.0f}..{b['x1']:.0f} px)")
    hx0, _, hx1, _ = b["holder"]
    if b["x0"] < hx0 - slack or b["x1"] > hx1 + slack:
      problems.append(f"{b['text']!r} runs out of its {b['tag']} ({b['x0']:.0f}..{b['x1']:.0f} "
                      f"px in {hx0:.0f}..{hx1:.0f})")
  # Overlap: fragments of different text nodes sharing more than a sliver (2 px) both ways.
  ordered = sorted(boxes, key=lambda b: b["y0"])
  for i, a in enumerate(ordered):
    for b in ordered[i + 1:]:
      if b["y0"] >= a["y1"] - 2:
        break
      if a["node"] == b["node"]:
        continue
      dx = min(a["x1"], b["x1"]) - max(a["x0"], b["x0"])
      dy = min(a["y1"], b["y1"]) - max(a["y0"], b["y0"])
      if dx > 2 and dy > 2:
        problems.append(f"{a['text']!r} and {b['text']!r} overlap ({dx:.0f} x {dy:.0f} px at "
                        f"{max(a['x0'], b['x0']):.0f},{max(a['y0'], b['y0']):.0f})")
  return problems


# --- the pages --------------------------------------------------------------------------------------
def program_of(example: str) -> str | None:
  """``examples.NAME:process`` (or ``:computation``) for an example with ``example_inputs``."""
  module = importlib.import_module(f"examples.{example}")
  if not callable(getattr(module, "example_inputs", None)):
    return None
  for attr in ("process", "computation"):
    if hasattr(module, attr):
      return f"examples.{example}:{attr}"
  return None


def write_page(example: str, out: Path, monkeypatch) -> Path:
  """The page ``faxbridge inspect`` writes for the example, as a user runs it from the repo."""
  from faxbridge._src import cli

  program = program_of(example)
  assert program, f"examples/{example}.py has no computation/process with example_inputs()"
  monkeypatch.chdir(REPO)
  page = out / f"{example}.html"
  assert cli.main(["inspect", program, "--html", str(page)]) == 0
  return page


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
  b = Browser(chromium_path())
  try:
    b.open_tab()
    yield b
  finally:
    b.close()


def check_page(browser: Browser, page: Path, width: int, shots: Path) -> None:
  text = page.read_text()
  ET.fromstring(text.split("\n", 1)[1])  # well-formed XHTML: XML tools read it too
  assert "<script" not in text and "http://" not in text.replace(
      'xmlns="http://www.w3.org/1999/xhtml"', "") and "https://" not in text  # self-contained
  browser.load(page, width)
  as_written = layout_problems(browser.evaluate(MEASURE))
  png = shots / f"{page.stem}_{width}.png"
  size = browser.screenshot(png)
  assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert struct.unpack(">II", png.read_bytes()[16:24]) == size and size[0] == width
  browser.evaluate(OPEN_ALL)
  opened = layout_problems(browser.evaluate(MEASURE))
  assert not as_written, f"{page.name} at {width} px: " + "; ".join(as_written[:10])
  assert not opened, f"{page.name} at {width} px, every group open: " + "; ".join(opened[:10])


@pytest.fixture(scope="module")
def fedavg_page(tmp_path_factory) -> Path:
  with pytest.MonkeyPatch.context() as mp:
    return write_page("fedavg", tmp_path_factory.mktemp("fedavg"), mp)


def test_the_fedavg_drawing_lays_out_cleanly_at_1280_px(browser, fedavg_page, tmp_path):
  check_page(browser, fedavg_page, 1280, tmp_path)


def _text(element: ET.Element) -> str:
  return " ".join("".join(element.itertext()).split())


def _by_class(root: ET.Element, cls: str) -> list[ET.Element]:
  return [e for e in root.iter() if cls in (e.get("class") or "").split()]


def _by_tag(root: ET.Element, tag: str) -> list[ET.Element]:
  return [e for e in root.iter() if e.tag == f"{{http://www.w3.org/1999/xhtml}}{tag}"]


def _badge_params(card: ET.Element) -> dict[str, str]:
  """A DP badge's parameters: each ``<dt>`` with its ``<dd>``."""
  return {_text(dt): _text(dd) for dl in _by_tag(card, "dl")
          for dt, dd in zip(_by_tag(dl, "dt"), _by_tag(dl, "dd"))}


def test_the_fedavg_drawing_shows_the_process_as_written(fedavg_page):
  """initialize is one server piece (no stages, no client count); next's aggregations are one row
  each, named by what they become; the broadcast's bytes are the model's."""
  from examples import _mlp

  root = ET.fromstring(fedavg_page.read_text().split("\n", 1)[1])
  sections = {s.get("id"): s for s in _by_class(root, "computation")}
  assert list(sections) == ["initialize", "next"]
  init = sections["initialize"]
  assert not _by_class(init, "grid") and "stage" not in _text(init).replace("stages", "")
  assert "server only · no clients, no stages" in _text(init).lower()
  assert "None" not in _text(root)

  rows = [[_text(td) for td in tr] for tr in _by_tag(_by_class(sections["next"], "aggs")[0], "tr")]
  rows = rows[1:]  # the header
  model = _mlp.init_params()  # fedavg: weighted_mean of each model leaf's delta and of the loss
  assert sorted(r[0] for r in rows) == ["weighted_mean"] * (len(model) + 1)
  for _, value, weight, params, result, used_by, leaves in rows:
    assert params == "-" and leaves.startswith("upload")
    assert weight == "data.count"  # fb.weighted_mean(..., data.count), as examples/fedavg.py has it
    if used_by != "out[1]":  # fb.weighted_mean(deltas, data.count)
      key = used_by.removeprefix("out[0]")
      assert used_by in {f"out[0][{k!r}]" for k in model}
      assert (value, result.split()[0]) == (f"deltas{key}", f"mean_delta{key}")
    else:  # fb.weighted_mean(losses, data.count)
      assert value == "losses"
  assert sorted(r[5] for r in rows) == sorted([f"out[0][{k!r}]" for k in model] + ["out[1]"])
  model_bytes = sum(np.asarray(v).nbytes for v in model.values())
  down = _text(_by_class(sections["next"], "wire-bytes")[0])
  assert down == f"{model_bytes / 1024:.1f} KiB per client"
  # The clients' examples are ragged (fb.ragged): drawn at the traced length, which is a bound.
  from examples import _data

  facts = [_text(li) for li in _by_tag(_by_class(sections["next"], "facts")[0], "li")]
  assert any(f.startswith("client inputs 3 leaves (at most ") for f in facts), facts
  tags = [_text(t) for t in _by_class(sections["next"], "tag")]
  own = f"own rows, at most {_data.EXAMPLE_LENGTH}"
  assert tags.count(own) == 2, tags  # x and y; not the count itself


def test_uploads_are_named_by_what_the_user_wrote_where_they_are_a_client_input():
  """A weight that is the clients' data as is (no client work computes it) is uploaded under its
  own name, ``data[1]``, in the figure and in the aggregations table."""
  import faxbridge as fb
  from faxbridge._src import drawing

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def weighted(scale, data):
    x, weight = data
    return fb.weighted_mean(fb.map(lambda s, v: s * v.mean(axis=0), fb.broadcast(scale), x), weight)

  form = fb.split(weighted, np.float32(2), (np.ones((3, 4, 2), np.float32), np.ones(3, np.float32)))
  root = ET.fromstring(drawing.round_html({"computation": form}, "w").split("\n", 1)[1])
  upload = _text(_by_class(root, "wire-cell")[1])
  assert "weight: data[1]" in upload and "12 B per client" in upload  # f32[2] and f32[]
  (row,) = [[_text(td) for td in tr] for tr in _by_tag(_by_class(root, "aggs")[0], "tr")][1:]
  assert row[0] == "weighted_mean" and row[2] == "data[1]" and row[5] == "out"


def test_dp_is_marked_where_it_clips_and_where_it_adds_noise():
  """dp_mean(clip_norm=2, noise_multiplier=0.8): the client card says it clips to C = 2, a server
  card adds the noise with multiplier 0.8, and no other card claims either."""
  import faxbridge as fb
  from faxbridge._src import drawing

  @fb.computation(in_placements=(fb.CLIENTS, fb.SERVER))
  def noised_mean(x, key):
    return fb.dp_mean(x, clip_norm=2.0, noise_multiplier=0.8, key=key)

  x = {"w": np.ones((4, 3, 2), np.float32), "b": np.ones((4, 2), np.float32)}
  form = fb.split(noised_mean, x, np.asarray([3, 11], np.uint32))
  root = ET.fromstring(drawing.round_html({"computation": form}, "dp").split("\n", 1)[1])
  clients, servers = _by_class(root, "clients"), _by_class(root, "server")
  cards = [c for c in [*clients, *servers] if "card" in c.get("class", "").split()]
  clipping = [c for c in cards if "DP clip" in _text(c)]
  noising = [c for c in cards if "DP noise" in _text(c)]
  assert [c in clients for c in clipping] == [True]
  assert _badge_params(clipping[0]) == {"C (clip norm)": "2"}
  assert "DP noise" not in _text(clipping[0])
  assert noising and all(c in servers for c in noising)
  assert _badge_params(noising[0]) == {"noise multiplier": "0.8"}


@pytest.mark.slow
@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_drawing_lays_out_cleanly_at_1280_and_1920_px(browser, tmp_path,
                                                                   monkeypatch, example):
  page = write_page(example, tmp_path, monkeypatch)
  for width in WIDTHS:
    check_page(browser, page, width, tmp_path)


def test_every_bundled_example_is_drawn():
  """The slow test's list is every example with a program and example inputs (none forgotten)."""
  drawn = [e for e in EXAMPLES if program_of(e)]
  assert set(drawn) >= {"fedavg", "fedsgd", "fedadam", "fedyogi", "analytics", "dp_fedavg",
                        "diloco", "branch_train_merge", "papa", "char_lm", "two_stage"}
  assert drawn == EXAMPLES


def test_the_layout_check_finds_overlapping_and_cut_off_text(browser, tmp_path):
  """The measurement itself: a page with text drawn over text, a line past the window and a
  label out of its box is refused for each."""
  page = tmp_path / "broken.html"
  page.write_text(
      '<!DOCTYPE html><html><body style="margin:0;font:14px sans-serif">'
      '<div style="position:absolute;left:10px;top:10px">first label</div>'
      '<div style="position:absolute;left:20px;top:12px">second label</div>'
      '<div style="position:absolute;left:1250px;top:100px;white-space:nowrap">past the edge</div>'
      '<div style="position:absolute;top:200px;width:40px;white-space:nowrap">too long for its box'
      '</div><details style="position:absolute;left:10px;top:300px"><summary>group</summary>'
      '<div style="position:absolute;top:0">hidden under group</div></details></body></html>')
  browser.load(page, 1280)
  problems = "\n".join(layout_problems(browser.evaluate(MEASURE)))
  assert "'first label' and 'second label' overlap" in problems
  assert "'past the edge' is cut off by the window" in problems
  assert "the page scrolls sideways" in problems
  assert "'too long for its box' runs out of its DIV" in problems
  assert "hidden under group" not in problems  # a closed group's contents are not drawn
  browser.evaluate(OPEN_ALL)
  assert "'group' and 'hidden under group' overlap" in "\n".join(
      layout_problems(browser.evaluate(MEASURE)))


@pytest.mark.slow
def test_a_model_of_200_leaves_is_drawn_by_its_groups(browser, tmp_path):
  """A 200-leaf model (50 layers of 4 leaves) is one line per group in the figure, each with its
  count and bytes, and every leaf is still there to open; laid out cleanly either way."""
  import jax
  import numpy as np

  import faxbridge as fb
  from faxbridge._src import drawing

  params = {f"layer{i:02d}": {k: np.full((8, 4), i, np.float32) for k in ("w", "b", "scale", "shift")}
            for i in range(50)}

  @fb.computation(in_placements=(fb.SERVER, fb.CLIENTS))
  def wide_round(params, data):
    deltas = fb.map(lambda p, x: jax.tree.map(lambda v: v * x.mean(), p), fb.broadcast(params),
                    data)
    return jax.tree.map(lambda p, d: p + d, params, fb.mean(deltas))

  form = fb.split(wide_round, params, np.ones((3, 5), np.float32))
  assert len(form.inputs) == 201 and len(form.stages[0].aggregations) == 200
  page = tmp_path / "wide.html"
  page.write_text(drawing.round_html({"computation": form}, "wide"))
  browser.load(page, 1280)
  assert not layout_problems(browser.evaluate(MEASURE))
  figure = browser.evaluate(
      "(() => { const f = document.querySelector('figure.round').getBoundingClientRect();"
      " return {height: f.height, text: document.querySelector('figure.round').innerText}; })()")
  assert figure["height"] < 900, figure["height"]  # a figure, not a 200-line list
  assert "200 leaves · 25.0 KiB" in figure["text"]  # params, its broadcast, the results
  assert "layer07" not in figure["text"]  # leaves and layers folded away
  browser.evaluate(OPEN_ALL)
  opened = browser.evaluate(MEASURE)
  assert not layout_problems(opened)
  shown = {b["text"] for b in opened["boxes"]}
  assert {f"['layer{i:02d}']" for i in range(50)} <= shown and "['shift']" in shown


def _docs_screenshots(out: Path) -> None:
  """The screenshots the docs show: the page's header and the round's figure at 1280 px (the
  tables under it are left out), as 256-colour PNGs."""
  from PIL import Image

  class _Chdir:  # the one monkeypatch method write_page uses, outside pytest
    chdir = staticmethod(os.chdir)

  figure_bottom = ("Math.ceil(document.querySelector('figure.round').getBoundingClientRect()"
                   ".bottom + scrollY + 24)")
  b = Browser(chromium_path())
  try:
    b.open_tab()
    with tempfile.TemporaryDirectory() as tmp:
      for example, name in DOCS_SHOTS.items():
        with contextlib.redirect_stdout(io.StringIO()):  # inspect's text report
          page = write_page(example, Path(tmp), _Chdir)
        b.load(page, 1280)
        problems = layout_problems(b.evaluate(MEASURE))
        assert not problems, problems
        b.screenshot(out / name)
        with Image.open(out / name) as full:
          image = full.crop((0, 0, full.width, min(full.height, b.evaluate(figure_bottom))))
        image.quantize(256).save(out / name, optimize=True)
        print(f"{out / name}: {image.width} x {image.height}, {(out / name).stat().st_size} B")
  finally:
    b.close()


if __name__ == "__main__":
  sys.path.insert(0, str(REPO))
  _docs_screenshots(Path(sys.argv[1]) if len(sys.argv) > 1 else REPO / "docs" / "images")
