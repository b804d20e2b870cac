"""trigscan scan-many: in-process and on a real local Ray cluster, worker and
driver deaths, re-runs that skip finished tasks, class groups, the manifest."""
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from trigscan import manyscan

pytestmark = pytest.mark.slow
METHODS = ["nc", "tabor"]
OPTIONS = {"nc": {"max_steps": 4}, "tabor": {"max_steps": 4}}
IMAGES = 20  # clean test images per scan (2 per class): keeps each scan to a second or two


@pytest.fixture(scope="module")
def entries(quick_zoo, tmp_path_factory):
    root, _ = quick_zoo
    return manyscan.zoo_entries(root, tmp_path_factory.mktemp("scan_data"), n_images=IMAGES, seed=0)


@pytest.fixture(scope="module")
def inprocess(entries, tmp_path_factory):
    out = tmp_path_factory.mktemp("inprocess")
    summary = manyscan.scan_many(entries, out, methods=METHODS, options=OPTIONS, log=lambda line: None)
    return out, summary


@pytest.fixture(scope="module")
def ray_cluster():
    """A real two-CPU Ray cluster on loopback, without dashboard, shut down after the module."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    import ray

    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=100 * 1024 ** 2,
             _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
    try:
        yield ray
    finally:
        ray.shutdown()


def results(out, summary) -> dict:
    """(model, method) -> the method's result without its timings."""
    found = {}
    for row in summary["rows"]:
        assert row["status"] == "done", row
        report = json.loads((Path(out) / row["report"]).read_text())
        (entry,) = report["results"]
        found[row["model"], row["method"]] = {k: v for k, v in entry.items() if k not in ("elapsed_s", "files", "images")}
    return found


def test_inprocess_run_writes_a_report_per_task_and_the_summary(entries, inprocess):
    out, summary = inprocess
    assert summary["tasks"] == len(entries) * len(METHODS)
    assert [(r["model"], r["method"]) for r in summary["rows"]] == [(e["name"], m) for e in entries for m in METHODS]
    for row in summary["rows"]:
        report = json.loads((out / row["report"]).read_text())
        assert report["results"][0]["method"] == row["method"]
        assert report["results"][0]["config"]["max_steps"] == 4
        assert report["model"]["path"].endswith(f"{row['model']}/model.pt")
        assert report["data"]["n"] == IMAGES
        assert row["backdoored"] == report["results"][0]["backdoored"]
        assert row["correct"] == manyscan.verdict_correct(row["truth"], row["backdoored"], row["targets"])
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(summary["rows"]))
    csv_lines = (out / "summary.csv").read_text().splitlines()
    assert len(csv_lines) == 1 + len(summary["rows"]) and csv_lines[0].startswith("model,method,status")
    assert all(f"{e['name']}" in (out / "summary.txt").read_text() for e in entries)


def test_ray_cluster_gives_the_inprocess_results(entries, inprocess, ray_cluster, tmp_path):
    out, summary = inprocess
    on_ray = manyscan.scan_many(entries, tmp_path, methods=METHODS, options=OPTIONS, ray="local",
                                log=lambda line: None)
    assert on_ray["run"]["mode"] == "ray local" and on_ray["run"]["ran"] == summary["tasks"]
    assert ray_cluster.is_initialized()  # the run used the cluster it found and left it running
    expected, got = results(out, summary), results(tmp_path, on_ray)
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key] == expected[key], key


def _killer(marker_dir: str, victim: str):
    """A scan function that SIGKILLs its own worker process the first time it
    starts optimising `victim`'s model (a marker file remembers the kill)."""

    def scan(model, data, methods, out_dir, **kwargs):
        import os
        import signal
        from pathlib import Path

        from trigscan.runner import run_scan

        name = Path(out_dir).parent.name
        attempts = Path(marker_dir) / f"{name}.attempts"
        with open(attempts, "a") as f:
            f.write(f"{os.getpid()}\n")

        def log(event):
            if name == victim and event.get("event") == "bar_start" and len(attempts.read_text().split()) == 1:
                os.kill(os.getpid(), signal.SIGKILL)

        return run_scan(model, data, methods, out_dir, log=log, **kwargs)

    return scan


def test_task_whose_worker_dies_is_retried(entries, inprocess, ray_cluster, tmp_path):
    out, summary = inprocess
    victim = entries[1]["name"]
    markers = tmp_path / "markers"
    markers.mkdir()
    on_ray = manyscan.scan_many(entries, tmp_path / "out", methods=["nc"], options={"nc": OPTIONS["nc"]},
                                ray="local", retries=2, scan_fn=_killer(str(markers), victim), log=lambda line: None)
    pids = (markers / f"{victim}.attempts").read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1]  # killed once, run again by another worker process
    assert all(len((markers / f"{e['name']}.attempts").read_text().split()) == 1 for e in entries
               if e["name"] != victim)
    expected = {k: v for k, v in results(out, summary).items() if k[1] == "nc"}
    assert results(tmp_path / "out", on_ray) == expected


def test_worker_death_on_every_attempt_is_reported_and_the_others_finish(entries, ray_cluster, tmp_path):
    victim = entries[0]["name"]
    always = tmp_path / "markers"
    always.mkdir()

    def scan(model, data, methods, out_dir, **kwargs):
        import os
        import signal
        from pathlib import Path

        from trigscan.runner import run_scan

        if Path(out_dir).parent.name == victim:
            os.kill(os.getpid(), signal.SIGKILL)
        return run_scan(model, data, methods, out_dir, **kwargs)

    summary = manyscan.scan_many(entries[:2], tmp_path / "out", methods=["nc"], options={"nc": OPTIONS["nc"]},
                                 ray="local", retries=1, scan_fn=scan, log=lambda line: None)
    status = {r["model"]: r["status"] for r in summary["rows"]}
    assert status == {victim: "error", entries[1]["name"]: "done"}
    error = summary["rows"][0]["error"]
    assert "2 attempt(s)" in error and ("Worker" in error or "worker" in error)


def test_killed_driver_loses_nothing_and_a_rerun_skips_finished_tasks(entries, inprocess, tmp_path):
    """SIGKILL the driver once the first task is done; the re-run scans only the
    rest, and the summary, rebuilt from the folders, matches an uninterrupted run."""
    out, summary = inprocess
    manifest = tmp_path / "manifest.json"
    manifest.write_text(json.dumps({"defaults": {"methods": ["nc"], "options": {"nc": OPTIONS["nc"]}},
                                    "models": entries}))
    cmd = [sys.executable, "-c", "import sys; from trigscan import manyscan as m; e, d = m.load_manifest(sys.argv[1]); "
           "m.scan_many(e, sys.argv[2], defaults=d, log=lambda line: None)", str(manifest), str(tmp_path / "out")]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = tmp_path / "out" / "tasks" / entries[0]["name"] / "nc" / "done.json"
    deadline = time.monotonic() + 120
    while not first.exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    assert first.exists(), "the first task did not finish before the deadline"
    finished = [e["name"] for e in entries if (tmp_path / "out" / "tasks" / e["name"] / "nc" / "done.json").exists()]
    assert len(finished) < len(entries), "the driver was not killed mid-run"

    ran = []

    def counting(model, data, methods, out_dir, **kwargs):
        from trigscan.runner import run_scan

        ran.append(Path(out_dir).parent.name)
        return run_scan(model, data, methods, out_dir, **kwargs)

    entries2, defaults = manyscan.load_manifest(manifest)
    again = manyscan.scan_many(entries2, tmp_path / "out", defaults=defaults, scan_fn=counting, log=lambda line: None)
    assert sorted(ran) == sorted(set(e["name"] for e in entries) - set(finished))
    expected = {k: v for k, v in results(out, summary).items() if k[1] == "nc"}
    assert results(tmp_path / "out", again) == expected

    # everything finished: nothing runs, and the summary comes back from the folders alone
    for name in ("summary.json", "summary.csv", "summary.txt"):
        (tmp_path / "out" / name).unlink()
    third = manyscan.scan_many(entries2, tmp_path / "out", defaults=defaults, scan_fn=counting,
                               log=lambda line: None)
    assert third["run"]["ran"] == 0 and len(ran) == len(entries) - len(finished)
    assert third["rows"] == again["rows"]
    assert (tmp_path / "out" / "summary.csv").read_text() == manyscan.to_csv(again)

    # changed settings make a finished task stale: it runs again
    third = manyscan.scan_many(entries2, tmp_path / "out", defaults=defaults, seed=None,
                               options=["nc.max_steps=3"], scan_fn=counting, log=lambda line: None)
    assert third["run"]["ran"] == len(entries)


def test_class_groups_merge_into_one_verdict(entries, tmp_path):
    from trigscan import scanners
    from trigscan.result import ClassResult

    entry = next(e for e in entries if e["truth"]["backdoored"])
    summary = manyscan.scan_many([entry], tmp_path, methods=["nc"], options={"nc": OPTIONS["nc"]},
                                 class_groups=2, log=lambda line: None)
    (row,) = summary["rows"]
    assert row["status"] == "done" and row["groups"] == 2
    assert row["report"] == f"tasks/{entry['name']}/nc.groups2/report.json"
    groups = [json.loads((tmp_path / "tasks" / entry["name"] / "nc.groups2" / f"group{k}" / "report.json").read_text())
              for k in range(2)]
    assert [[c["class"] for c in g["results"][0]["per_class"]] for g in groups] == [[0, 1, 2, 3, 4], [5, 6, 7, 8, 9]]
    merged = json.loads((tmp_path / row["report"]).read_text())["results"][0]
    rows = [c for g in groups for c in g["results"][0]["per_class"]]
    assert merged["per_class"] == rows
    targets, anomaly = scanners.get("nc")(**OPTIONS["nc"])._verdict(
        [ClassResult(target=c["class"], statistic=c["statistic"], asr=c["asr"], converged=c["converged"],
                     steps=c["steps"]) for c in rows])
    assert merged["targets"] == targets == row["targets"] and merged["anomaly"]["values"] == anomaly.values
    assert row["backdoored"] == bool(targets)
    assert [g["report"] for g in merged["groups"]] == [f"tasks/{entry['name']}/nc.groups2/group{k}/report.json"
                                                        for k in range(2)]
    # the unsplit scan of the same model has its own folder: neither overwrites the other
    whole = manyscan.scan_many([entry], tmp_path, methods=["nc"], options={"nc": OPTIONS["nc"]}, log=lambda line: None)
    assert whole["rows"][0]["report"] == f"tasks/{entry['name']}/nc/report.json"
    again = manyscan.scan_many([entry], tmp_path, methods=["nc"], options={"nc": OPTIONS["nc"]}, class_groups=2,
                               log=lambda line: None)
    assert again["run"]["ran"] == 0 and again["rows"][0]["targets"] == row["targets"]

    with pytest.raises(ValueError, match="--class-groups 6: model .* has 10 candidate classes"):
        manyscan.plan_tasks([entry], methods=["nc"], class_groups=6)
    with pytest.raises(ValueError, match="method 'pixel' cannot be split by classes: in pair mode"):
        manyscan.plan_tasks([entry], methods=["pixel"], options={"pixel": {"mode": "pair"}}, class_groups=2)
    with pytest.raises(ValueError, match="method 'lred' cannot be split by classes"):
        manyscan.plan_tasks([entry], methods=["lred"], class_groups=2)
    with pytest.raises(ValueError, match="--class-groups: model 'x' needs 'classes' or 'num_classes'"):
        manyscan.plan_tasks([{"name": "x", "model": entry["model"]}], methods=["nc"], class_groups=2)


def test_zoo_folder_is_scanned_as_zoo_eval_scans_it(quick_zoo, entries, inprocess):
    """Same images, seed and options as trigscan zoo eval: the same verdicts and statistics."""
    import torch

    from trigscan.zoo.evaluate import evaluate

    root, _ = quick_zoo
    _, summary = inprocess
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each scan-many task
    try:
        report = evaluate(root, ["nc"], options={"nc": OPTIONS["nc"]}, n_images=IMAGES, seed=0, quiet=True)
    finally:
        torch.set_num_threads(threads)
    ours = {r["model"]: r for r in summary["rows"] if r["method"] == "nc"}
    for r in report["rows"]:
        mine = ours[r["model"]]
        assert (mine["backdoored"], mine["targets"], mine["correct"]) == (r["verdict"], r["found"], r["correct"])
        report_path = Path(summary["out"]) / mine["report"]
        stats = [c["statistic"] for c in json.loads(report_path.read_text())["results"][0]["per_class"]]
        assert stats == [c["statistic"] for c in r["result"]["per_class"]]
    acc = summary["summary"]["nc"]["accuracy"]
    assert acc == report["summary"]["nc"]["accuracy"]


def test_manifest_errors_name_the_problem(tmp_path, entries):
    def load(doc):
        path = tmp_path / "m.json"
        path.write_text(json.dumps(doc) if not isinstance(doc, str) else doc)
        return manyscan.load_manifest(path)

    with pytest.raises(ValueError, match="MANIFEST: no such file"):
        manyscan.load_manifest(tmp_path / "nope.json")
    with pytest.raises(ValueError, match="not valid JSON"):
        load("{models: ")
    with pytest.raises(ValueError, match=r"entry 0: unknown key\(s\) \['modle'\]"):
        load([{"model": "a.pt", "modle": "b.pt"}])
    with pytest.raises(ValueError, match="entry 1: expected an object with at least 'model'"):
        load([{"model": "a.pt"}, {"data": "x.npz"}])
    with pytest.raises(ValueError, match="'models' must be a non-empty list"):
        load({"models": []})
    got, _ = load({"models": [{"model": "sub/a.pt", "data": "d.npz"}]})
    assert got == [{"name": "a", "model": str(tmp_path / "sub" / "a.pt"), "data": str(tmp_path / "d.npz")}]
    with pytest.raises(ValueError, match="names must be unique; repeated: a"):
        manyscan.plan_tasks(got * 2, methods=["nc"])
    with pytest.raises(ValueError, match="--method: no method for model 'a'"):
        manyscan.plan_tasks(got)
    with pytest.raises(ValueError, match="method 'nc' has no option 'max_step'"):
        manyscan.plan_tasks(got, methods=["nc"], options=["nc.max_step=3"])
    with pytest.raises(ValueError, match="--workers: only with --ray local"):
        manyscan.scan_many(got, tmp_path / "o", methods=["nc"], workers=2)
    with pytest.raises(ValueError, match="--device: expected auto, cpu or cuda"):
        manyscan.scan_many(got, tmp_path / "o", methods=["nc"], device="tpu")


def test_failing_task_is_reported_and_run_again(entries, tmp_path):
    broken = dict(entries[0], name="broken", data=str(tmp_path / "missing.npz"))
    summary = manyscan.scan_many([broken, entries[1]], tmp_path / "out", methods=["nc"],
                                 options={"nc": OPTIONS["nc"]}, log=lambda line: None)
    assert [r["status"] for r in summary["rows"]] == ["error", "done"]
    assert "missing.npz" in summary["rows"][0]["error"]
    ran = []

    def counting(model, data, methods, out_dir, **kwargs):
        ran.append(Path(out_dir).parent.name)
        raise RuntimeError("still broken")

    again = manyscan.scan_many([broken, entries[1]], tmp_path / "out", methods=["nc"], options={"nc": OPTIONS["nc"]},
                               scan_fn=counting, log=lambda line: None)
    assert ran == ["broken"] and again["rows"][0]["error"] == "broken/nc: RuntimeError: still broken"


def test_resource_requests_follow_the_device(entries):
    assert manyscan.choose_device("auto", 0, None) == ("cpu", 0.0)
    assert manyscan.choose_device("auto", 4, None) == ("cuda", 1.0)
    assert manyscan.choose_device("auto", 4, 0.5) == ("cuda", 0.5)
    assert manyscan.choose_device("cpu", 4, None) == ("cpu", 0.0)
    with pytest.raises(ValueError, match="--device cuda: no GPU"):
        manyscan.choose_device("cuda", 0, None)
    with pytest.raises(ValueError, match="--gpus-per-task: CUDA tasks need a GPU share > 0"):
        manyscan.choose_device("cuda", 2, 0)
    # white-box tasks go to the GPU with their share; ONNX (black-box) ones stay on the CPU
    tasks = manyscan.plan_tasks(entries[:1], methods=["nc", "b3d"], device="cuda", threads=2)
    assert [(t["method"], t["device"], t["model"].rsplit(".", 1)[1]) for t in tasks] == [
        ("nc", "cuda", "pt"), ("b3d", "cpu", "onnx")]
    assert [manyscan.task_resources(t, 0.5) for t in tasks] == [{"num_cpus": 2, "num_gpus": 0.5},
                                                               {"num_cpus": 2, "num_gpus": 0}]


def test_command_line(entries, tmp_path, capsys):
    from trigscan.cli import main

    manifest = tmp_path / "m.json"
    manifest.write_text(json.dumps({"defaults": {"options": {"nc": OPTIONS["nc"]}}, "models": entries[2:3]}))
    assert main(["scan-many", str(manifest), "--out", str(tmp_path / "out"), "--method", "nc"]) == 0
    printed = capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    (row,) = summary["rows"]
    assert row["status"] == "done" and f"[1/1] {entries[2]['name']}/nc:" in printed
    assert (tmp_path / "out" / "summary.txt").read_text().strip() in printed
    assert main(["scan-many", str(tmp_path / "none.json"), "--out", str(tmp_path / "o2")]) == 2
    assert "MANIFEST: no such file" in capsys.readouterr().err
    assert main(["scan-many", str(manifest), "--out", str(tmp_path / "o3"), "--method", "nc",
                 "--class-groups", "1"]) == 2
    assert "--class-groups: expected an integer >= 2" in capsys.readouterr().err
