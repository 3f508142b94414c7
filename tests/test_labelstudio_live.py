"""The annotator round trip against a real Label Studio (the version pinned in
infra/labelstudio-constraints.txt, in .venv-labelstudio: ``make test`` installs it when missing).

One server per module, started here on 127.0.0.1 with its own data folder and stopped by its process
group at the end, set up as docs/annotators.md says: local files served, the run folder as document root,
a Local files storage at OUT/blobs. A small flagged run (tests/test_verdicts_precision.py) is exported as
``cropclean`` writes it; its config makes a project, its tasks are imported, and its images are fetched
through the server as a logged-in user and shown in the labelling page (headless Chromium). Annotations are
made by the page's Submit button and, in the page's shape, through the API: keep, relabel, drop, a later
annotation replaced by an update of an earlier one, a skipped task. Every export format that answers
(JSON, JSON-MIN, CSV, TSV) goes back through ``cropclean verdicts import``. Pre-label tasks (``cropclean
predict``'s files, for a run folder below the document root) import with their boxes and display too.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import requests

from pipeline.annotate import export, labelstudio
from pipeline.annotate.verdicts import read_overrides
from pipeline.cli import main
from tests.test_verdicts_precision import CLASSES, SIZE, make_flagged_run

ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CONSTRAINTS = ROOT / "infra" / "labelstudio-constraints.txt"
LS_VENV = Path(os.environ.get("CROPCLEAN_LABEL_STUDIO_VENV", ROOT / ".venv-labelstudio"))
EMAIL, PASSWORD = "annotator@example.com", "not-a-secret-7"
TOKEN = "cropclean0live0test0token"  # a legacy API token, set when the server creates the user
STARTUP_DEADLINE_S = 600  # the first start migrates a new database: about 45 s on 2 idle cores
PAGE_TIMEOUT_MS = 180_000
# Server start, the labelling page in Chromium and a dozen API calls.
pytestmark = pytest.mark.timeout(1200)
EXPORTS = ("JSON", "JSON_MIN", "CSV", "TSV")
# What the annotations below come to: img0 by the page's Submit (the suggestion donuts), img1 kept, img2
# dropped by the update of its first annotation after a second one relabelled it; img3 skipped.
EXPECTED = {"img0": ("relabel", "donuts"), "img1": ("keep", None), "img2": ("drop", None)}


def pinned_version() -> str:
    found = re.search(r"^label-studio==(\S+)$", CONSTRAINTS.read_text(), re.M)
    assert found, f"{CONSTRAINTS} pins no label-studio"
    return found.group(1)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Server:
    url: str
    proc: subprocess.Popen
    log: Path
    root: Path  # the document root: the run folder
    seconds_to_start: float
    api: requests.Session = field(default_factory=requests.Session)

    def call(self, method: str, path: str, expect: int = 200, raw: bool = False, **kwargs: Any) -> Any:
        """An API call as the project's user; its JSON (or, ``raw``, the response)."""
        r = self.api.request(method, self.url + path, timeout=120, **kwargs)
        assert r.status_code == expect, f"{method} {path}: {r.status_code} {r.text[:500]}"
        return r if raw else r.json()


def _log_tail(log: Path) -> str:
    return log.read_text(errors="replace")[-3000:] if log.exists() else ""


def _stop(proc: subprocess.Popen) -> None:
    """The server and every process it started: its process group, by the id this test started it with."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tmp_path_factory, request) -> Server:
    exe = LS_VENV / "bin" / "label-studio"
    assert exe.is_file(), f"{exe} is missing: make test installs it (make labelstudio)"
    ask = [str(LS_VENV / "bin" / "python"), "-c", "import label_studio as l; print(l.__version__)"]
    version = subprocess.run(ask, capture_output=True, text=True, check=True).stdout.strip()
    assert version == pinned_version(), f"{LS_VENV} holds Label Studio {version}; run make labelstudio"
    base = tmp_path_factory.mktemp("labelstudio")
    run = make_flagged_run(base / "run")
    with contextlib.redirect_stdout(io.StringIO()):
        assert main(["export", str(run)]) == 0  # the default image URLs, as `cropclean crop` writes them
    (base / "data").mkdir()
    (base / "home").mkdir()
    port = free_port()
    env = {  # nothing of the caller's environment but PATH: Label Studio reads unprefixed names too
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(base / "home"), "LANG": "C.UTF-8",
        "LABEL_STUDIO_LOCAL_FILES_SERVING_ENABLED": "true",
        "LABEL_STUDIO_LOCAL_FILES_DOCUMENT_ROOT": str(run),
        "LABEL_STUDIO_USERNAME": EMAIL, "LABEL_STUDIO_PASSWORD": PASSWORD, "LABEL_STUDIO_USER_TOKEN": TOKEN,
        "LABEL_STUDIO_BASE_DATA_DIR": str(base / "data"), "LABEL_STUDIO_LATEST_VERSION_CHECK": "false",
        "LABEL_STUDIO_COLLECT_ANALYTICS": "false",
    }  # fmt: skip
    log = base / "label-studio.log"
    command = [str(exe), "start", "--no-browser", "--internal-host", "127.0.0.1", "-p", str(port),
               "--data-dir", str(base / "data"), "--enable-legacy-api-token"]  # fmt: skip
    start = time.monotonic()
    with log.open("wb") as sink:
        proc = subprocess.Popen(command, cwd=base, env=env, stdout=sink, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    request.addfinalizer(lambda: _stop(proc))
    deadline = start + STARTUP_DEADLINE_S
    while True:
        assert proc.poll() is None, f"Label Studio exited with {proc.returncode}:\n{_log_tail(log)}"
        moved = re.findall(r"Trying to start at (\d+)", log.read_text(errors="replace"))
        url = f"http://127.0.0.1:{moved[-1] if moved else port}"  # it moves on when the port was taken
        with contextlib.suppress(requests.RequestException, ValueError):
            if requests.get(f"{url}/health", timeout=5).json().get("status") == "UP":
                break
        assert time.monotonic() < deadline, (
            f"Label Studio did not answer in {STARTUP_DEADLINE_S} s:\n{_log_tail(log)}"
        )
        time.sleep(1)
    s = Server(url, proc, log, run, time.monotonic() - start)
    s.api.headers["Authorization"] = f"Token {TOKEN}"
    ARTIFACTS.mkdir(exist_ok=True)  # what starting it cost here, for the record (never asserted)
    (ARTIFACTS / "labelstudio-live.json").write_text(json.dumps(
        {"label_studio": version, "seconds_to_start": round(s.seconds_to_start, 1)}) + "\n")  # fmt: skip
    return s


def logged_in(server: Server) -> requests.Session:
    """A browser's session: the login form, then its cookie."""
    session = requests.Session()
    session.get(f"{server.url}/user/login/", timeout=60)
    r = session.post(f"{server.url}/user/login/", timeout=60, allow_redirects=False,
                     data={"email": EMAIL, "password": PASSWORD,
                           "csrfmiddlewaretoken": session.cookies["csrftoken"]})  # fmt: skip
    assert r.status_code == 302 and "sessionid" in session.cookies, r.text[:500]
    return session


def ui_result(choice: str, origin: str = "manual") -> list[dict[str, Any]]:
    """A Choices answer as the labelling page serializes it."""
    return [{"id": f"r{abs(hash(choice)) % 10**6}", "type": "choices", "value": {"choices": [choice]},
             "origin": origin, "to_name": labelstudio.IMAGE, "from_name": labelstudio.CHOICES}]  # fmt: skip


def annotate(server: Server, project: int, task: int, choice: str | None, **more: Any) -> dict[str, Any]:
    """POST /api/tasks/<id>/annotations/ with the body the labelling page sends on Submit (lsf-sdk.js's
    prepareData); ``choice`` None skips the task, as its Skip button does."""
    body = {"lead_time": 4.2, "result": ui_result(choice) if choice else [], "draft_id": 0,
            "parent_prediction": None, "parent_annotation": None, "started_at": "2026-12-04T10:00:00.000Z",
            **more}  # fmt: skip
    query = f"?project={project}" + ("&was_cancelled=1" if choice is None else "")
    return server.call("POST", f"/api/tasks/{task}/annotations/{query}", 201, json=body)


@dataclass
class Project:
    id: int
    tasks: dict[str, dict[str, Any]]  # image_id -> the task as the API returns it
    imported: dict[str, Any]
    refused_at_root: str
    page: dict[str, Any]  # what the labelling page showed
    exports: dict[str, Path]  # format -> the file as downloaded, under Label Studio's own name


def _wait(check: Any, what: str, seconds: float = 120) -> Any:
    deadline = time.monotonic() + seconds
    while not (found := check()):
        assert time.monotonic() < deadline, f"no {what} after {seconds} s"
        time.sleep(0.5)
    return found


def label_in_the_page(server: Server, project: int, task: int) -> dict[str, Any]:
    """Log in, open the task's labelling page, read what it shows, screenshot it, and press Submit (the
    suggestion is pre-filled: submitting accepts it)."""
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    assert chromium, "Debian's chromium is not installed (make test installs it)"
    ARTIFACTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.set_default_timeout(PAGE_TIMEOUT_MS)
            page.goto(f"{server.url}/user/login/")
            page.fill("input[name=email]", EMAIL)
            page.fill("input[name=password]", PASSWORD)
            page.click("button[type=submit]")
            page.wait_for_url(lambda url: "/user/login" not in url)
            page.goto(f"{server.url}/projects/{project}/data?task={task}")
            shown = page.wait_for_function(
                """() => { const i = [...document.querySelectorAll('img')].find(
                              i => i.src.includes('local-files') && i.complete && i.naturalWidth > 0);
                           return i && {src: i.src, width: i.naturalWidth, height: i.naturalHeight}; }"""
            ).json_value()
            header = page.locator("text=Given:").first.inner_text()
            page.screenshot(path=str(ARTIFACTS / "labelstudio-task.png"))
            page.get_by_role("button", name="Submit").click()
            _wait(lambda: server.call("GET", f"/api/tasks/{task}")["total_annotations"] == 1, "annotation")
        finally:
            browser.close()
    return {**shown, "header": header}


@pytest.fixture(scope="module")
def project(server: Server) -> Project:
    run = server.root
    config = (run / "export" / export.CONFIG).read_text()
    pid = server.call(
        "POST", "/api/projects/", 201, json={"title": "cropclean blacklist", "label_config": config}
    )["id"]
    # The storage the docs named before: the document root itself, which Label Studio refuses.
    refused = server.call(
        "POST", "/api/storages/localfiles/", 400, raw=True, json={"project": pid, "path": str(run)}
    ).text
    server.call("POST", "/api/storages/localfiles/", 201,
                json={"project": pid, "path": str(run / "blobs"), "title": "images of the run"})  # fmt: skip
    tasks = json.loads((run / "export" / export.BLACKLIST_TASKS).read_text())
    imported = server.call("POST", f"/api/projects/{pid}/import", 201, json=tasks)
    listed = server.call("GET", f"/api/tasks/?project={pid}&page_size=100")["tasks"]
    by_image = {t["data"]["image_id"]: t for t in listed}
    page = label_in_the_page(server, pid, by_image["img0"]["id"])
    annotate(server, pid, by_image["img1"]["id"], "donuts")  # keep: the given label
    first = annotate(server, pid, by_image["img2"]["id"], labelstudio.DROP)
    annotate(server, pid, by_image["img2"]["id"], "donuts")  # a second annotation, created later
    # The first is updated afterwards (the page's Update: PATCH): updated last, it is the answer.
    server.call("PATCH", f"/api/annotations/{first['id']}/", json={"result": ui_result(labelstudio.DROP),
                                                                   "lead_time": 6.1})  # fmt: skip
    annotate(server, pid, by_image["img3"]["id"], None)  # skipped
    folder = run.parent / "exports"
    exports = {}
    for kind in EXPORTS:
        r = server.call(
            "GET", f"/api/projects/{pid}/export?exportType={kind}&download_all_tasks=true", raw=True
        )
        name = re.search(r'filename="?([^";]+)', r.headers["Content-Disposition"]).group(1)
        (folder / kind).mkdir(parents=True)
        exports[kind] = folder / kind / name
        exports[kind].write_bytes(r.content)
    return Project(pid, by_image, imported, refused, page, exports)


def verdicts(run: Path) -> dict[str, tuple[str, str | None]]:
    o = read_overrides(str(run))
    return {
        r.image_id: (r.verdict, r.new_label if isinstance(r.new_label, str) else None) for r in o.itertuples()
    }


def cli(*args: str) -> str:
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main(list(args)) == 0
    return printed.getvalue()


def test_the_documented_setup_shows_the_images_and_the_header_as_written(server, project):
    assert "cannot be the same as LOCAL_FILES_DOCUMENT_ROOT" in project.refused_at_root
    assert (project.imported["task_count"], project.imported["prediction_count"]) == (4, 4)
    assert (
        project.tasks["img0"]["data"]["image"]
        == f"/data/local-files/?d={project.tasks['img0']['data']['path']}"
    )
    session = logged_in(server)
    for task in project.tasks.values():
        r = session.get(server.url + task["data"]["image"], timeout=60)
        assert r.status_code == 200 and r.headers["Content-Type"] == "image/jpeg"
        assert r.content == (server.root / task["data"]["path"]).read_bytes()
    assert requests.get(server.url + project.tasks["img0"]["data"]["image"], timeout=60).status_code == 401
    # The labelling page itself: the image decoded in the browser, the header as the task's data has it.
    assert (project.page["width"], project.page["height"]) == SIZE
    assert project.page["header"] == "Given: churros. Suggested: donuts. churros: best 0/2"
    assert project.page["header"] == project.tasks["img0"]["data"]["header"]


@pytest.mark.parametrize("kind", EXPORTS)
def test_every_export_format_comes_back_as_the_same_verdicts(server, project, kind):
    path = project.exports[kind]
    printed = cli("verdicts", "import", str(path), "--out", str(server.root), "--replace")
    shown = {"JSON": "JSON", "JSON_MIN": "JSON-MIN", "CSV": "CSV", "TSV": "TSV"}[kind]
    assert f"imported 3 verdicts from {path} (read as Label Studio's {shown} export)" in printed
    # The skipped task: a cancelled annotation in the JSON export; the flat exports leave it out.
    assert ("1 row without a verdict left out" in printed) == (kind == "JSON")
    assert verdicts(server.root) == EXPECTED
    assert set(read_overrides(str(server.root))["annotator"]) == {"1"}  # Label Studio's user id
    if kind == "TSV":
        assert path.suffix == ".csv"  # Label Studio names it so; the header's tabs tell


def test_annotators_are_named_by_email_with_a_legacy_or_a_personal_token(server, project):
    path = str(project.exports["JSON_MIN"])
    cli("verdicts", "import", path, "--out", str(server.root), "--replace", "--labelstudio-url", server.url,
        "--labelstudio-token", TOKEN)  # fmt: skip
    assert set(read_overrides(str(server.root))["annotator"]) == {EMAIL}
    personal = server.call("POST", "/api/token/", 201)["token"]  # Label Studio 1.2x's default kind
    assert personal.count(".") == 2
    cli("verdicts", "import", str(project.exports["JSON"]), "--out", str(server.root), "--replace",
        "--labelstudio-url", server.url, "--labelstudio-token", personal)  # fmt: skip
    assert set(read_overrides(str(server.root))["annotator"]) == {EMAIL}
    assert verdicts(server.root) == EXPECTED


def test_after_the_import_the_precision_is_known_and_reviewed_images_are_not_sent_again(server, project):
    cli("verdicts", "import", str(project.exports["CSV"]), "--out", str(server.root), "--replace")
    review = json.loads((server.root / "metrics.json").read_text())["review"]
    # Flagged 0.95 (relabelled), 0.8 (kept), 0.6 (dropped): 2 of 3; the top flag alone reaches 0.9.
    assert (review["reviewed"], review["confirmed"]) == (3, 2)
    assert review["threshold"]["score"] == pytest.approx(0.95) and review["threshold"]["reviewed"] == 1
    printed = cli("export", str(server.root))
    assert "3 blacklisted images left out: they already have a verdict" in printed
    tasks = json.loads((server.root / "export" / export.BLACKLIST_TASKS).read_text())
    assert [t["data"]["image_id"] for t in tasks] == ["img3"]


def test_prelabel_tasks_of_a_run_below_the_document_root_import_with_boxes_and_display(server):
    from pipeline.stages.predict import PRELABEL_TASKS, PredictStage

    # A pre-labelled run folder (cropclean predict's OUT2) inside the document root: its image URLs carry
    # its path under the root (cropclean predict --image-prefix '/data/local-files/?d=prelabelled/').
    out2 = server.root / "prelabelled"
    images = pd.read_parquet(server.root / "manifests" / "images.parquet").head(2)
    for path in images["path"]:
        (out2 / path).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(server.root / path, out2 / path)
    rows = images.assign(
        predicted_label=images["label"], confidence=0.97, unsure=False, x0=4, y0=6, x1=40, y1=30
    )
    prefix = export.local_files_prefix(str(out2), str(server.root))
    assert prefix == "/data/local-files/?d=prelabelled/"
    PredictStage(str(server.root), image_prefix=prefix).write_export(str(out2), rows, CLASSES)
    config = (out2 / "export" / export.CONFIG).read_text()
    pid = server.call(
        "POST", "/api/projects/", 201, json={"title": "cropclean prelabels", "label_config": config}
    )["id"]
    server.call("POST", "/api/storages/localfiles/", 201, json={"project": pid, "path": str(out2 / "blobs")})
    tasks = json.loads((out2 / "export" / PRELABEL_TASKS).read_text())
    imported = server.call("POST", f"/api/projects/{pid}/import", 201, json=tasks)
    assert (imported["task_count"], imported["prediction_count"]) == (2, 2)
    session = logged_in(server)
    for task in server.call("GET", f"/api/tasks/?project={pid}")["tasks"]:
        (prediction,) = server.call("GET", f"/api/predictions/?task={task['id']}")
        kinds = {r["type"] for r in prediction["result"]}
        assert kinds == {"choices", "rectanglelabels"}
        r = session.get(server.url + task["data"]["image"], timeout=60)
        assert r.status_code == 200 and r.content == (out2 / task["data"]["path"]).read_bytes()
