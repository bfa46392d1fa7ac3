"""MLflow's own UI over a store that raysae's Tracker wrote, as a real browser shows it: a real
`mlflow server` on a free local port, headless Chromium dumping the DOM of its single-page app.

What MLflow 3.17's UI does, found in its bundle (mlflow/server/js/build) and checked here:

- It does not read the experiment's `mlflow.experimentKind` tag to pick the landing page. Its
  kind comes from the "GenAI / Model training" switch of the side bar: `?workflowType=` in the
  URL, else localStorage `mlflow.workflowType_v1`, else `genai`. A plain experiment URL opens
  the GenAI overview in a fresh browser with the tag or without it (the tag-reading path sits
  behind a feature flag that this build hard-codes off). The tag is still written (checked over
  REST) and is what older 3.x UIs read.
- `?workflowType=machine_learning` opens the runs table. A sweep's child runs are collapsed
  under the parent there, and which rows are expanded is not URL state.
- A shared view (`?viewStateShareKey=K`; the view is JSON in the experiment tag
  `mlflow.sharedViewState.K`, the tag the UI's own "share" writes) can sort by run name, which
  lists the children flat (MLflow nests children only in the default sort by start time), and
  can add columns for raysae's grid-axis tags.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from html.parser import HTMLParser
from pathlib import Path

import pytest
from conftest import browser, headless
from mlflow.tracking import MlflowClient

from raysae.tracking import EXPERIMENT_KIND, Tracker

SWEEP = "ui-check sweep"
CHILDREN = {  # run name -> (grid-axis tags, fvu)
    "L1 scratch": ({"raysae.phase": "scratch", "raysae.layer": "1", "raysae.budget": "4096"}, 0.25),
    "L2<-L1 fwd": ({"raysae.phase": "transfer", "raysae.layer": "2", "raysae.direction": "fwd",
                    "raysae.budget": "4096"}, 0.5),
    "L1<-L2 bwd": ({"raysae.phase": "transfer", "raysae.layer": "1", "raysae.direction": "bwd",
                    "raysae.budget": "4096"}, 0.125),
}
AXES = ("raysae.phase", "raysae.layer", "raysae.direction", "raysae.budget")
SHARE_KEY = "raysae-grid"
SHARED_VIEW = {  # keys of MLflow's runs-table view state
    "orderByKey": "tags.`mlflow.runName`",
    "orderByAsc": True,
    "selectedColumns": [*(f"tags.`{a}`" for a in AXES), "metrics.`fvu`"],
}
KIND_KEY, KIND = next(iter(EXPERIMENT_KIND.items()))


@dataclass(frozen=True)
class Store:
    url: str
    kind_id: str  # made by the Tracker
    bare_id: str  # made by MlflowClient, no kind
    adopted_id: str  # made without a kind, then opened by a Tracker
    parent: str
    children: dict[str, str]  # name -> run id


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def build_store(root: Path) -> tuple[str, dict[str, str]]:
    """The Tracker's store: a sweep parent, three children with grid-axis tags and metrics."""
    tracker = Tracker(f"sqlite:///{root.resolve() / 'mlflow.db'}", "ui-check", root / "mlartifacts")
    parent = tracker.open_run("sweep", SWEEP, tags={"raysae.phase": "sweep"})
    children = {}
    for i, (name, (tags, fvu)) in enumerate(CHILDREN.items()):
        run = tracker.open_run(f"child-{i}", name, tags=tags, params={"lr": "0.001"}, parent=parent)
        tracker.log_metrics(run, {"fvu": fvu, "l0": 8.0 + i}, step=4096)
        tracker.finish(run)
        children[name] = run
    tracker.finish(parent)
    return tracker.uri, {"": parent, **children}


@pytest.fixture(scope="module")
def ui(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Store]:
    browser()  # no browser: skip (fail in CI) before spending seconds on a server
    root = tmp_path_factory.mktemp("mlflow-ui")
    uri, runs = build_store(root)
    parent = runs.pop("")
    client = MlflowClient(uri)
    kind_id = client.get_experiment_by_name("ui-check").experiment_id
    client.set_experiment_tag(kind_id, f"mlflow.sharedViewState.{SHARE_KEY}", json.dumps(SHARED_VIEW))
    artifacts = (root / "mlartifacts").resolve().as_uri()
    bare_id = client.create_experiment("no-kind", artifacts)
    client.set_terminated(client.create_run(bare_id, run_name="plain run").info.run_id)
    adopted_id = client.create_experiment("made-before-the-kind", artifacts)
    Tracker(uri, "made-before-the-kind")

    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    env.update(MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false",  # no job runner: starts ~3x faster
               MLFLOW_DISABLE_TELEMETRY="true")
    log = root / "server.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server did not answer (exit {proc.poll()}):\n"
                            f"{log.read_text()[-3000:]}")
            time.sleep(0.3)
        yield Store(url, kind_id, bare_id, adopted_id, parent, runs)
    finally:
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(proc.pid, sig)
                proc.wait(timeout=10)
                break
            except ProcessLookupError:
                break
            except subprocess.TimeoutExpired:
                continue


def rest(ui: Store, path: str, body: dict | None = None) -> dict:
    """GET, or POST with a JSON body."""
    req = urllib.request.Request(f"{ui.url}/api/2.0/mlflow/{path}")
    if body is not None:
        req.data = json.dumps(body).encode()
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def experiment_tags(ui: Store, experiment_id: str) -> dict[str, str]:
    exp = rest(ui, f"experiments/get?experiment_id={experiment_id}")["experiment"]
    return {t["key"]: t["value"] for t in exp.get("tags", [])}


# ---------------------------------------------------------------------------------------------
# The rendered DOM


_VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source",
         "track", "wbr"}


class Page(HTMLParser):
    """A dumped DOM: its title, its text, and the runs grid's cells by run id and column id
    (the grid, ag-grid, splits a row over pinned and scrolled containers that share `row-id`)."""

    def __init__(self) -> None:
        super().__init__()
        self.title = ""
        self.text: list[str] = []
        self.rows: dict[str, dict[str, list[str]]] = {}
        self._open: list[tuple[str, str | None, str | None]] = []
        self._titles = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "title":
            self._titles += 1
        if tag not in _VOID:
            row = a.get("row-id") if a.get("role") == "row" else None
            col = a.get("col-id") if a.get("role") == "gridcell" else None
            self._open.append((tag, row, col))

    def handle_endtag(self, tag: str) -> None:
        while tag not in _VOID and self._open and self._open.pop()[0] != tag:
            pass

    def handle_data(self, data: str) -> None:
        if self._open and self._open[-1][0] == "title" and self._titles == 1:
            self.title += data  # the first <title>; icons carry their own
        if not (data := data.strip()) or self._open and self._open[-1][0] in ("style", "script"):
            return
        self.text.append(data)
        row = next((r for _, r, _ in reversed(self._open) if r), None)
        col = next((c for _, _, c in reversed(self._open) if c), None)
        if row and col:
            self.rows.setdefault(row, {}).setdefault(col, []).append(data)

    @property
    def tab(self) -> str:
        """The experiment page's tab from the title, 'Runs - Experiment 1 - MLflow': Runs."""
        m = re.match(r"(.+?) - Experiment \d+ - MLflow", self.title)
        return m.group(1) if m else ""

    def cell(self, run_id: str, column: str) -> str:
        """The last text of a cell (the run-name cell starts with its colour swatch's code)."""
        return self.rows.get(run_id, {}).get(column, [""])[-1]

    def matching_runs(self) -> int | None:
        m = re.search(r"(\d+) matching runs", " ".join(self.text))
        return int(m.group(1)) if m else None


def render(url: str, tmp: Path, ready: Callable[[Page], bool], tries: int = 3) -> Page:
    """The DOM once the app has rendered; a fresh profile each time (no stored UI switch)."""
    page = Page()
    for attempt in range(tries):
        try:
            dom = headless(url, "--dump-dom", f"--virtual-time-budget={15_000 * (attempt + 1)}",
                           "--window-size=2400,1200", f"--user-data-dir={tmp / f'profile-{attempt}'}")
        except subprocess.SubprocessError:
            if attempt == tries - 1:
                raise
            continue
        page = Page()
        page.feed(dom.stdout)
        if ready(page):
            break
    return page


# ---------------------------------------------------------------------------------------------
# The checks


def test_experiments_carry_the_kind_over_rest(ui):
    assert experiment_tags(ui, ui.kind_id).get(KIND_KEY) == KIND == "custom_model_development"
    assert experiment_tags(ui, ui.adopted_id).get(KIND_KEY) == KIND  # set when a Tracker opens it
    assert KIND_KEY not in experiment_tags(ui, ui.bare_id)
    runs = rest(ui, "runs/search", {"experiment_ids": [ui.kind_id]})
    assert {r["info"]["run_name"] for r in runs["runs"]} == {SWEEP, *CHILDREN}


def test_the_kind_does_not_pick_the_landing_page(ui, tmp_path):
    """In MLflow 3.17 a plain experiment URL opens the GenAI overview, tag or no tag.

    If this fails after an MLflow upgrade because the tagged experiment opens on Runs, the tag
    steers the UI again: assert that instead (the bare one is the negative control)."""
    pages = {}
    for name, exp_id in (("kind", ui.kind_id), ("bare", ui.bare_id)):
        pages[name] = render(f"{ui.url}/#/experiments/{exp_id}", tmp_path / name, lambda p: bool(p.tab))
    for name, page in pages.items():
        assert page.tab == "Overview", (name, page.title)
        assert {"Traces", "Token Usage"} <= set(page.text), name  # the GenAI overview's cards
        assert not page.rows, name
    assert SWEEP not in pages["kind"].text


def test_model_training_switch_opens_the_runs_table(ui, tmp_path):
    """`?workflowType=machine_learning` (the side bar's "Model training") lands on Runs."""
    url = f"{ui.url}/#/experiments/{ui.kind_id}?workflowType=machine_learning"
    page = render(url, tmp_path, lambda p: p.tab == "Runs" and ui.parent in p.rows)
    assert page.tab == "Runs", page.title
    assert page.cell(ui.parent, "attributes.`Run Name`") == SWEEP
    # The children are in the table (the count), collapsed under the parent (no rows of their
    # own in 3.17: expanding is a click, and expanded rows are not URL state).
    assert page.matching_runs() == 1 + len(CHILDREN)
    assert set(page.rows) <= {ui.parent, *ui.children.values()}


def test_shared_view_lists_children_with_grid_axes(ui, tmp_path):
    """The shared view sorts by name (children flat, each its own row) with grid-axis columns."""
    url = (f"{ui.url}/#/experiments/{ui.kind_id}/runs?workflowType=machine_learning"
           f"&viewStateShareKey={SHARE_KEY}")
    everyone = {ui.parent, *ui.children.values()}
    page = render(url, tmp_path, lambda p: set(p.rows) == everyone)
    assert page.tab == "Runs", page.title
    assert set(page.rows) == everyone, page.rows
    assert page.cell(ui.parent, "attributes.`Run Name`") == SWEEP
    assert page.cell(ui.parent, "tags.`raysae.phase`") == "sweep"
    for name, run_id in ui.children.items():
        tags, fvu = CHILDREN[name]
        assert page.cell(run_id, "attributes.`Run Name`") == name
        for axis in AXES:
            assert page.cell(run_id, f"tags.`{axis}`") == tags.get(axis, "-"), (name, axis)
        assert float(page.cell(run_id, "metrics.`fvu`")) == fvu
