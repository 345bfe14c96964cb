"""JupyterLab in a real browser: what a person sees with Modbox Python.

One JupyterLab server for the module (``lab_helpers.start_lab``: 127.0.0.1, a random
port and token, its root a temporary folder holding ``data.csv``), Debian's Chromium
driven by Playwright, and kernels on the embedded backend, as a user without a Modbox
account gets them. Each test opens a fresh workspace, clicks the "Modbox Python" tile
in the Launcher and works through the UI (typing, Shift+Enter, toolbar buttons, menus,
the Running panel), asserting on what the page shows. A failing test leaves a
screenshot and the browser console in ``test-artifacts/<test name>/``. The last test
compares the browser console with the python3 kernel's in the same cells.
"""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest
from kernel_helpers import embedded_env
from lab_helpers import (
    CHROMIUM_ARGS,
    MODBOX,
    PYTHON3,
    LabServer,
    Notebook,
    open_notebook,
    require_chromium,
    save_artifacts,
    start_lab,
    stop_lab,
)
from service_helpers import wait_until

pytestmark = [pytest.mark.kernel, pytest.mark.browser, pytest.mark.timeout(180)]

ARTIFACTS = Path(__file__).resolve().parents[1] / "test-artifacts"
#: Browser console errors and page errors, per kernel, over the whole module.
CONSOLE: dict[str, list[str]] = {MODBOX: [], PYTHON3: []}


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabServer]:
    root = tmp_path_factory.mktemp("lab-root")
    (root / "data.csv").write_text("city,visitors\nLisbon,31\nOslo,17\nQuito,23\n")
    server = start_lab(root, tmp_path_factory.mktemp("lab-state"), embedded_env())
    try:
        yield server
    finally:
        left = stop_lab(server)
        assert left == [], f"jupyter lab left processes behind: {left}"


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    executable = require_chromium()
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def page(request: pytest.FixtureRequest, browser: Any, lab: LabServer) -> Iterator[Any]:
    """A fresh page; its console is recorded, and saved with a screenshot on failure."""
    context = browser.new_context(viewport={"width": 1400, "height": 900})
    page = context.new_page()
    page.set_default_timeout(30_000)
    console: list[str] = []
    page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
    page.on("pageerror", lambda e: console.append(f"pageerror: {e}"))
    page.console_lines = console  # type: ignore[attr-defined]
    try:
        yield page
    finally:
        kernel = PYTHON3 if "python3" in request.node.name else MODBOX
        CONSOLE[kernel].extend(line for line in console if _is_error(line))
        report = getattr(request.node, "rep_call", None)
        if report is not None and report.failed:
            save_artifacts(ARTIFACTS / re.sub(r"[^\w.-]+", "_", request.node.name), page, console)
        lab.shut_down_kernels()
        context.close()


def _is_error(line: str) -> bool:
    return line.startswith(("error:", "pageerror:"))


def _ran(notebook: Notebook, code: str, **kwargs: Any) -> str:
    return notebook.output_text(notebook.run(code, **kwargs)).strip()


# --------------------------------------------------------------------------- scenarios


def test_the_launcher_tile_opens_a_notebook_that_computes(page: Any, lab: LabServer) -> None:
    page.goto(lab.fresh_url())
    tile = page.locator(f".jp-LauncherCard[data-category='Notebook'][title='{MODBOX}']")
    tile.wait_for()
    logo = tile.locator("img.jp-Launcher-kernelIcon")
    assert "/kernelspecs/modbox-python/logo-" in (logo.get_attribute("src") or "")
    assert logo.evaluate("img => img.complete && img.naturalWidth > 0")  # it loaded
    tile.click()
    notebook = Notebook(page)
    notebook.wait_idle()
    assert _ran(notebook, "1+1") == "2"


def test_state_lives_across_cells_and_output_streams_live(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    notebook.run("x = 21")
    assert _ran(notebook, "x * 2") == "42"
    code = "import time\nfor i in range(4):\n    print(f'line {i}', flush=True)\n    time.sleep(1)"
    cell = notebook.run(code, paste=True, wait=False)
    output = cell.locator(".jp-OutputArea-output")
    output.filter(has_text="line 0").first.wait_for(timeout=15_000)
    # The first line is on the page while the cell is still running.
    assert cell.locator(".jp-InputArea-prompt").inner_text().strip() == "[*]:"
    assert "line 3" not in notebook.output_text(cell)
    notebook.wait_finished(cell)
    assert notebook.output_text(cell).split() == [
        "line",
        "0",
        "line",
        "1",
        "line",
        "2",
        "line",
        "3",
    ]


def test_a_plot_is_an_image_and_a_dataframe_is_a_table(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    cell = notebook.run(
        "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.title('visits')\nplt.show()",
        paste=True,
    )
    image = cell.locator(".jp-RenderedImage img")
    image.wait_for()
    assert image.evaluate("img => img.complete && img.naturalWidth > 100")
    cell = notebook.run("import pandas as pd\npd.read_csv('data.csv')", paste=True)
    table = cell.locator(".jp-RenderedHTMLCommon table.dataframe")
    table.wait_for()
    headers = [h.strip() for h in table.locator("thead th").all_inner_texts()]
    assert headers[-2:] == ["city", "visitors"]
    rows = [r.split("\t") for r in table.locator("tbody tr").all_inner_texts()]
    assert [row[-2:] for row in rows] == [["Lisbon", "31"], ["Oslo", "17"], ["Quito", "23"]]


def test_a_file_a_cell_writes_appears_in_the_file_browser(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    listing = page.locator(".jp-DirListing-itemText")
    listing.filter(has_text="data.csv").first.wait_for()
    assert listing.filter(has_text="out.csv").count() == 0
    notebook.run("import pandas as pd\npd.DataFrame({'a': [1]}).to_csv('out.csv')", paste=True)
    # On the host when the cell is done, where the file browser lists it.
    assert (lab.root / "out.csv").read_text() == ",a\n0,1\n"
    listing.filter(has_text="out.csv").first.wait_for(timeout=30_000)
    (lab.root / "out.csv").unlink()


def test_an_exception_shows_a_coloured_traceback(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    cell = notebook.run("def divide(a):\n    return a / 0\ndivide(1)", paste=True)
    error = cell.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
    error.wait_for()
    text = error.inner_text()
    assert "ZeroDivisionError" in text and "divide(1)" in text and "return a / 0" in text
    coloured = error.locator("span[class*='ansi-'][class*='-fg']")
    assert coloured.count() >= 3, error.inner_html()[:500]


def test_input_shows_a_box_and_the_typed_value_comes_back(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    cell = notebook.run("name = input('Your name: ')\nprint('hello', name)", paste=True, wait=False)
    box = cell.locator("input.jp-Stdin-input")
    box.wait_for()
    assert "Your name:" in cell.locator(".jp-Stdin").inner_text()
    box.fill("Ada")
    box.press("Enter")
    notebook.wait_finished(cell)
    assert "hello Ada" in notebook.output_text(cell)


def test_the_stop_button_interrupts_and_restart_clears(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    notebook.run("kept = 41")
    cell = notebook.run("import time\ntime.sleep(60)", paste=True, wait=False)
    page.locator(".jp-StatusBar-Widget", has_text=f"{MODBOX} | Busy").first.wait_for()
    time.sleep(0.5)
    clicked = time.monotonic()
    notebook.toolbar_button("notebook:interrupt-kernel").click()
    cell.locator(".jp-OutputArea-output", has_text="KeyboardInterrupt").first.wait_for(
        timeout=10_000
    )
    took = time.monotonic() - clicked
    assert took < 1.0, f"the interrupt took {took:.2f} s to show"
    notebook.wait_finished(cell)
    assert _ran(notebook, "kept + 1") == "42"
    page.locator("#jp-menu-panel .lm-MenuBar-itemLabel", has_text="Kernel").click()
    page.locator(".lm-Menu-itemLabel", has_text=re.compile(r"^Restart Kernel…$")).click()
    page.locator(".jp-Dialog button.jp-mod-accept").click()
    page.wait_for_timeout(500)
    notebook.wait_idle()
    assert "NameError" in _ran(notebook, "kept")


def test_a_slider_moves_with_the_keyboard_and_interact_rerenders(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    cell = notebook.run("import ipywidgets as w\ns = w.IntSlider(value=5, max=10)\ns", paste=True)
    handle = cell.locator(".widget-slider .noUi-handle")
    handle.wait_for()
    handle.focus()
    page.keyboard.press("ArrowRight")
    page.keyboard.press("ArrowRight")
    readout = cell.locator(".widget-readout")
    wait_until(lambda: readout.inner_text().strip() == "7", 10, 0.1)
    assert readout.inner_text().strip() == "7"
    page.wait_for_timeout(300)  # the frontend sends the change as a comm message
    assert _ran(notebook, "print(s.value)") == "7"
    code = (
        "from ipywidgets import interact\n"
        "@interact(n=(0, 10))\n"
        "def show(n=3):\n"
        "    print('n is', n)"
    )
    cell = notebook.run(code, paste=True)
    cell.locator(".widget-output", has_text="n is 3").first.wait_for()
    handle = cell.locator(".widget-slider .noUi-handle")
    handle.focus()
    page.keyboard.press("ArrowRight")
    cell.locator(".widget-output", has_text="n is 4").first.wait_for(timeout=15_000)
    assert "n is 3" not in cell.locator(".widget-output").inner_text()


def test_tab_completes_and_shift_tab_shows_a_signature(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    notebook.run("import collections")
    notebook.type_into_last_cell("collections.Ord")
    page.keyboard.press("Tab")
    completer = page.locator(".jp-Completer")
    completer.wait_for(timeout=30_000)
    assert "OrderedDict" in completer.inner_text()
    page.keyboard.press("Escape")
    page.keyboard.press("Control+a")
    page.keyboard.type("len(")
    page.keyboard.press("Shift+Tab")
    tooltip = page.locator(".jp-Tooltip")
    tooltip.wait_for(timeout=30_000)
    text = tooltip.inner_text()
    assert "len(obj" in text and "number of items" in text, text


def test_shutting_down_from_the_running_panel_leaves_nothing(page: Any, lab: LabServer) -> None:
    notebook = open_notebook(page, lab)
    assert _ran(notebook, "import os\nos.getpid() > 0", paste=True) == "True"
    (kernel,) = lab.kernels()
    process = lab.kernel_process(kernel["id"])
    tree = [process, *process.children(recursive=True)]
    names = " ".join(" ".join(p.cmdline()) for p in tree)
    # The kernel, its embedded service and the sandbox's jail all belong to it.
    assert "modbox_kernel.local" in names and len(tree) >= 3, names
    page.locator(".jp-SideBar [data-id='jp-running-sessions']").click()
    # Under the "Modbox Python" kernelspec, the kernel's own row has the Shut Down button.
    spec = page.locator(".jp-RunningSessions-item.jp-mod-kernelspec", has_text=MODBOX)
    row = spec.locator(f".jp-RunningSessions-item.jp-mod-kernel[data-context='{kernel['id']}']")
    row.wait_for()
    row.hover()
    row.locator(".jp-RunningSessions-itemShutdown").first.click()
    assert wait_until(lambda: lab.kernels() == [], 20)
    _, alive = psutil.wait_procs(tree, timeout=20)
    assert alive == [], [" ".join(p.cmdline()) for p in alive]


BASIC_CELLS = [
    ("1+1", False),
    ("print('out')", False),
    ("import matplotlib.pyplot as plt\nplt.plot([1, 2])\nplt.show()", True),
    ("import pandas as pd\npd.read_csv('data.csv')", True),
    ("1/0", False),
]


@pytest.mark.parametrize("kernel", [PYTHON3, MODBOX], ids=["python3", "modbox"])
def test_the_same_cells_under_each_kernel(page: Any, lab: LabServer, kernel: str) -> None:
    notebook = open_notebook(page, lab, kernel)
    shown = [_ran(notebook, code, paste=paste) for code, paste in BASIC_CELLS]
    assert shown[0] == "2" and shown[1] == "out" and "ZeroDivisionError" in shown[4]
    SHOWN[kernel] = shown


SHOWN: dict[str, list[str]] = {}


def _normalised(line: str) -> str:
    """A console line without what differs between runs (ports, ids, tokens, counts)."""
    return re.sub(r"[0-9a-f]{8,}|\d+", "N", line)


def test_no_console_error_that_python3_does_not_also_give(lab: LabServer) -> None:
    assert set(SHOWN) == {PYTHON3, MODBOX}, "the two runs above must have run first"
    assert SHOWN[MODBOX][:2] == SHOWN[PYTHON3][:2]
    assert SHOWN[MODBOX][3] == SHOWN[PYTHON3][3]  # the same table
    python3 = {_normalised(line) for line in CONSOLE[PYTHON3]}
    extra = [line for line in CONSOLE[MODBOX] if _normalised(line) not in python3]
    assert extra == [], "\n".join(extra)


def test_the_debugger_stops_at_a_breakpoint_and_shows_the_local_variable(
    page: Any, lab: LabServer
) -> None:
    notebook = open_notebook(page, lab)
    bug = page.locator(".jp-NotebookPanel-toolbar .jp-DebuggerBugButton")
    assert wait_until(lambda: bug.is_enabled(), 30), "the debugger button stays disabled"
    bug.click()
    assert wait_until(lambda: bug.get_attribute("aria-pressed") == "true", 30)
    index = notebook.cells.count() - 1
    notebook.type_into_last_cell(
        "def double(a):\n    b = a * 2\n    return b\n\nprint(double(21))", paste=True
    )
    cell = notebook.cell(index)  # not cells.last: running the cell adds a new one
    # A click in the breakpoint gutter beside the second line, as a person sets one.
    line = cell.locator(".cm-line").nth(1).bounding_box()
    gutter = cell.locator(".cm-gutter.cm-breakpoint-gutter").bounding_box()
    assert line is not None and gutter is not None
    page.mouse.click(gutter["x"] + gutter["width"] / 2, line["y"] + line["height"] / 2)
    page.locator(".jp-DebuggerBreakpoint").first.wait_for()  # listed in the sidebar
    cell.locator(".cm-content").click()
    page.keyboard.press("Shift+Enter")
    variables = page.locator(".jp-DebuggerVariables")
    shows_a = lambda: re.search(r"\ba\b[\s\S]*\b21\b", variables.inner_text()) is not None  # noqa: E731
    assert wait_until(shows_a, 60), f"Variables panel: {variables.inner_text()!r}"
    prompt = cell.locator(".jp-InputArea-prompt").inner_text().strip()
    assert prompt == "[*]:", f"the cell is not held at the breakpoint: {prompt}"
    assert notebook.output_text(cell) == ""
    page.locator("[data-command='debugger:continue']").first.click()
    notebook.wait_finished(cell)
    assert notebook.output_text(cell).strip() == "42"
    bug.click()  # debugging off again: the next cell runs as before
    assert _ran(notebook, "print('after')") == "after"
