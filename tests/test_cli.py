"""The command line: info/version, and `trigscan scan` end to end on quick-zoo
models (white-box TorchScript and black-box ONNX): report.json contents, the
files beside it, exit codes, re-runs that read finished methods back, and bad
input (exit 2, one line on stderr, no traceback).

Scans use tiny settings (a few steps); what they detect is tested with the
scanners, except the L-RED scan that must give exit code 10."""
import hashlib
import json
import pickle

import numpy as np
import pytest
import torch

from trigscan import __version__
from trigscan._extension import OP_NAMES
from trigscan.cli import main
from trigscan.data import read_npz, save_npz
from trigscan.runner import SCHEMA_VERSION

NC_TINY = ["--option", "max_steps=3", "--option", "batch_size=16"]
B3D_TINY = ["--option", "k=2", "--option", "max_steps=2", "--option", "batch_size=4"]


def test_info_lists_every_op_with_its_cpu_kernel(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for op in OP_NAMES:
        line = next(l for l in out.splitlines() if f"trigscan::{op} " in l)
        assert "CPU" in line.split() and "Meta" in line.split()
    assert "nc" in out and "b3d" in out


def test_info_json_is_build_info(capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["loaded"] is True and set(info["ops"]) == set(OP_NAMES)


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"trigscan {__version__}"


def test_unknown_command_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["frobnicate"])
    assert exit_info.value.code == 2


# ---------------------------------------------------------------------------
# scan, end to end
# ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def zoo_files(quick_zoo, tmp_path_factory):
    """Paths of quick-zoo models and small scan sets (20 and 40 labelled test images)."""
    root, _ = quick_zoo
    tmp = tmp_path_factory.mktemp("cli_data")
    test = read_npz(root / "badnets-cnn-grey" / "test.npz")
    x, y = test["x"], test["y"]
    pick = np.concatenate([np.flatnonzero(y == c)[:2] for c in range(10)])  # 2 per class
    save_npz(tmp / "small.npz", x=x[pick], y=y[pick])
    pick4 = np.concatenate([np.flatnonzero(y == c)[:4] for c in range(10)])
    save_npz(tmp / "four.npz", x=x[pick4], y=y[pick4])
    save_npz(tmp / "unlabelled.npz", x=x[pick])
    return {"root": root, "small": tmp / "small.npz", "four": tmp / "four.npz",
            "unlabelled": tmp / "unlabelled.npz", "tmp": tmp}


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def scan(argv, capsys):
    code = main(["scan", *map(str, argv)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_white_box_scan_writes_the_report(zoo_files, tmp_path, capsys):
    model = zoo_files["root"] / "badnets-cnn-grey" / "model.pt"
    out = tmp_path / "out"
    code, stdout, _ = scan([model, "--data", zoo_files["small"], "--method", "nc", "--out", out,
                            "--seed", "3", *NC_TINY], capsys)
    report = json.loads((out / "report.json").read_text())
    assert code == (10 if report["backdoored"] else 0)
    assert report["schema_version"] == SCHEMA_VERSION and report["trigscan_version"] == __version__
    assert report["model"] == {**report["model"], "path": str(model), "sha256": sha256(model),
                               "access": "white", "format": "torchscript", "num_classes": 10}
    assert report["data"]["sha256"] == sha256(zoo_files["small"]) and report["data"]["n"] == 20
    (entry,) = report["results"]
    assert entry["method"] == "nc" and entry["seed"] == 3
    assert entry["config"]["max_steps"] == 3 and entry["config"]["batch_size"] == 16
    assert [r["class"] for r in entry["per_class"]] == list(range(10))
    for row in entry["per_class"]:
        assert set(row) >= {"class", "statistic", "asr", "converged", "steps", "queries"}
        assert 1 <= row["steps"] <= 3 and row["queries"] == 0
        for kind in ("mask", "pattern", "stamped"):
            assert (out / row["images"][kind]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert entry["anomaly"]["kind"] == "mad" and len(entry["anomaly"]["values"]) == 10
    assert entry["anomaly"]["threshold"] == 2.0
    # one method: its verdict is also the report's
    assert (report["backdoored"], report["targets"]) == (entry["backdoored"], entry["targets"])
    # the final table and the html
    assert "nc" in stdout and str(out / "report.html") in stdout
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 1 + 30  # summary + 3 images x 10 classes
    assert "src='images/" not in html  # self-contained
    assert (out / "summary.png").read_bytes()[:4] == b"\x89PNG"
    triggers = np.load(out / "triggers" / "nc.npz", allow_pickle=False)
    assert triggers["class3_mask"].shape == (1, 24, 24)


def test_lred_finds_the_backdoor_and_exits_10(zoo_files, tmp_path, capsys):
    root = zoo_files["root"]
    model = root / "sparse-additive-cnn-grey" / "model.pt"
    truth = json.loads((root / "sparse-additive-cnn-grey" / "truth.json").read_text())
    code, stdout, _ = scan([model, "--data", zoo_files["four"], "--method", "lred", "--out", tmp_path,
                            "--option", "images_per_class=4", "--option", "delta=0.03"], capsys)
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == 10
    assert report["backdoored"] is True and report["targets"] == truth["targets"]
    anomaly = report["results"][0]["anomaly"]
    assert anomaly["kind"] == "gamma" and anomaly["p_value"] < 0.05
    assert "BACKDOORED" in stdout


def test_onnx_black_box_scan_counts_queries_within_the_budget(zoo_files, tmp_path, capsys):
    model = zoo_files["root"] / "badnets-cnn-grey" / "model.onnx"
    code, _, _ = scan([model, "--data", zoo_files["small"], "--method", "b3d", "--out", tmp_path,
                       "--classes", "0", "3", "5", "--budget", "100000", *B3D_TINY], capsys)
    report = json.loads((tmp_path / "report.json").read_text())
    assert code == (10 if report["backdoored"] else 0)
    assert report["model"]["access"] == "black" and report["model"]["format"] == "onnx"
    assert report["scan"]["classes"] == [0, 3, 5] and report["scan"]["budget"] == 100000
    (entry,) = report["results"]
    assert [r["class"] for r in entry["per_class"]] == [0, 3, 5]
    # 2 steps x (2k + 1 rows) x 4 images per class
    assert [r["queries"] for r in entry["per_class"]] == [2 * (2 * 2 + 1) * 4] * 3
    assert entry["queries"] == 3 * 2 * (2 * 2 + 1) * 4


def test_b3d_ss_needs_no_data_and_a_small_budget_gives_a_partial_result(zoo_files, tmp_path, capsys):
    model = zoo_files["root"] / "clean-cnn-grey-s0" / "model.onnx"
    code, _, _ = scan([model, "--method", "b3d-ss", "--out", tmp_path, "--budget", "200",
                       "--option", "synthetic_samples=8", *B3D_TINY], capsys)
    report = json.loads((tmp_path / "report.json").read_text())
    assert code in (0, 10) and report["data"]["n"] == 0 and report["data"]["path"] is None
    (entry,) = report["results"]
    assert entry["partial"] is True and 0 < entry["queries"] <= 200


def test_several_methods_share_one_report_and_a_rerun_reads_them_back(zoo_files, tmp_path, capsys):
    model = zoo_files["root"] / "clean-cnn-grey-s0" / "model.pt"
    argv = [model, "--data", zoo_files["small"], "--method", "nc", "--method", "lred", "--out", tmp_path,
            "--option", "max_steps=3", "--option", "lred.images_per_class=2", "--log", "jsonl"]
    code, stdout, _ = scan(argv, capsys)
    events = [json.loads(line) for line in stdout.splitlines()]
    first = json.loads((tmp_path / "report.json").read_text())
    assert code == (10 if first["backdoored"] else 0)
    assert [e["method"] for e in first["results"]] == ["nc", "lred"]
    assert first["results"][0]["config"]["max_steps"] == 3 == first["results"][1]["config"]["max_steps"]
    assert first["results"][1]["config"]["images_per_class"] == 2
    assert first["backdoored"] == any(e["backdoored"] for e in first["results"])
    kinds = [e["event"] for e in events]
    assert kinds[0] == "method_start" and kinds[-1] == "report"
    assert {"bar_start", "bar", "bar_end", "method_done"} <= set(kinds)
    assert all("method" in e for e in events if e["event"].startswith("bar"))
    # the same command again: both methods are read back, the report is the same
    code2, stdout2, _ = scan(argv, capsys)
    second = json.loads((tmp_path / "report.json").read_text())
    assert code2 == code
    assert [json.loads(l)["event"] for l in stdout2.splitlines()] == ["method_reused", "method_reused", "report"]
    first.pop("elapsed_s"), second.pop("elapsed_s")
    assert second == first
    # another seed in the same folder is refused, not mixed in
    code3, _, err = scan([*argv[:-2], "--seed", "1"], capsys)
    assert code3 == 2 and "differs in seed" in err and len(err.strip().splitlines()) == 1


def test_factory_with_weights_only_state_dict(zoo_files, tmp_path, capsys, monkeypatch):
    scripted = torch.jit.load(str(zoo_files["root"] / "clean-cnn-grey-s0" / "model.pt"))
    torch.save(scripted.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "demo_factory_mod.py").write_text(
        "from trigscan.zoo.nets import make_model\n"
        "def build():\n    return make_model('cnn', 1, 24, 10, 0)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    code, _, err = scan(["demo_factory_mod:build", "--weights", tmp_path / "weights.pt", "--data",
                         zoo_files["small"], "--method", "nc", "--out", tmp_path / "out", *NC_TINY], capsys)
    assert code in (0, 10), err
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["format"] == "factory" and report["model"]["sha256"] == sha256(tmp_path / "weights.pt")
    # a whole pickled module as weights is refused (weights_only), with the reason
    torch.save(scripted.state_dict() | {"extra": object()}, tmp_path / "object.pt")
    code, _, err = scan(["demo_factory_mod:build", "--weights", tmp_path / "object.pt", "--data",
                         zoo_files["small"], "--method", "nc", "--out", tmp_path / "out2"], capsys)
    assert code == 2 and "--weights" in err and "weights_only" in err and "Traceback" not in err


def test_option_values_are_checked_against_the_method_config(zoo_files, tmp_path, capsys):
    model = zoo_files["root"] / "clean-cnn-grey-s0" / "model.pt"
    base = [model, "--data", zoo_files["small"], "--method", "nc", "--out", tmp_path]
    for option, words in (("max_steps=abc", ["max_steps", "int"]), ("max_steps=2.5", ["max_steps", "int"]),
                          ("no_such=1", ["no_such"]), ("lr=-1", ["lr", "> 0"]),
                          ("lred.images_per_class=2", ["lred"])):
        code, _, err = scan([*base, "--option", option], capsys)
        assert code == 2, option
        assert err.startswith("trigscan: error:") and len(err.strip().splitlines()) == 1
        assert all(w in err for w in words), (option, err)
    assert not (tmp_path / "report.json").exists()


# ---------------------------------------------------------------------------
# bad input: exit 2, one line naming the problem, no traceback
# ---------------------------------------------------------------------------
def bad_inputs(zoo_files, tmp):
    root = zoo_files["root"]
    pt = root / "clean-cnn-grey-s0" / "model.pt"
    data = ["--data", zoo_files["small"]]
    torch.save(torch.nn.Linear(2, 2), tmp / "module.pt")  # a pickled module (torch.save zip)
    (tmp / "model.pkl").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    (tmp / "broken.onnx").write_bytes(b"\x08\x07" + bytes(range(256)) * 4)
    save_npz(tmp / "rgb.npz", x=np.zeros((4, 3, 32, 32), np.float32), y=np.zeros(4, np.int64))
    save_npz(tmp / "hwc.npz", x=np.zeros((4, 24, 24, 1), np.float32))
    return {
        "missing model": ([tmp / "nope.pt", *data, "--method", "nc"], ["MODEL", "nope.pt"]),
        "missing data": ([pt, "--data", tmp / "nope.npz", "--method", "nc"], ["--data", "nope.npz"]),
        "no data": ([pt, "--method", "nc"], ["--data", "nc"]),
        "pickled module": ([tmp / "module.pt", *data, "--method", "nc"], ["module.pt", "unpickl"]),
        "pickle": ([tmp / "model.pkl", *data, "--method", "nc"], ["model.pkl", "pickle"]),
        "corrupted onnx": ([tmp / "broken.onnx", *data, "--method", "b3d"], ["broken.onnx", "ONNX"]),
        "wrong shape data": ([pt, "--data", tmp / "rgb.npz", "--method", "nc"], ["--data", "3, 32, 32"]),
        "wrong shape onnx": ([root / "clean-cnn-grey-s0" / "model.onnx", "--data", tmp / "rgb.npz",
                              "--method", "b3d"], ["--data", "[3, 32, 32]", "[1, 24, 24]"]),
        "channels last": ([pt, "--data", tmp / "hwc.npz", "--method", "nc"], ["hwc.npz", "channels-last"]),
        "unknown method": ([pt, *data, "--method", "frob"], ["frob", "nc"]),
        "white method on onnx": ([root / "clean-cnn-grey-s0" / "model.onnx", *data, "--method", "nc"],
                                 ["nc", "white-box"]),
        "class out of range": ([pt, *data, "--method", "nc", "--classes", "3", "12"], ["--classes", "12"]),
        "bad normalize": ([pt, *data, "--method", "nc", "--normalize", "0.5"], ["--normalize"]),
        "labels needed": ([pt, "--data", zoo_files["unlabelled"], "--method", "lred"], ["labels", "lred"]),
    }


def test_bad_input_exits_2_with_one_line(zoo_files, tmp_path, capsys):
    for name, (argv, words) in bad_inputs(zoo_files, tmp_path).items():
        code, stdout, err = scan([*argv, "--out", tmp_path / "out", "--option", "max_steps=2"], capsys)
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("trigscan: error: "), (name, err)
        assert "Traceback" not in err, name
        assert all(w in lines[0] for w in words), (name, lines[0])
    assert not (tmp_path / "out" / "report.json").exists()


def test_debug_shows_the_traceback(zoo_files, tmp_path):
    with pytest.raises(ValueError, match="MODEL"):
        main(["scan", str(tmp_path / "nope.pt"), "--data", str(zoo_files["small"]), "--method", "nc",
              "--debug"])


def test_scan_help_lists_the_registered_methods(capsys):
    import trigscan.scanners as registry

    with pytest.raises(SystemExit):
        main(["scan", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in registry.available())
    assert "0 clean, 10 backdoored" in out


# ---------------------------------------------------------------------------
# the summary figure's threshold line
# ---------------------------------------------------------------------------
def test_statistic_threshold_is_where_the_mad_test_flips():
    from trigscan.detect import mad_anomaly_index, true_median
    from trigscan.report import statistic_threshold

    stats = [20.0, 22.0, 25.0, 19.0, 30.0, 24.0, 21.0, 5.0, 26.0, 13.0]
    index = mad_anomaly_index(stats)
    entry = {"method": "nc", "targets": [],
             "per_class": [{"class": i, "statistic": s, "source": None} for i, s in enumerate(stats)],
             "anomaly": {"kind": "mad", "values": index.tolist(), "threshold": 2.0, "side": "low", "details": {}}}
    threshold = statistic_threshold(entry)
    median = true_median(stats)
    assert [s < threshold for s in stats] == [a > 2.0 and s < median for s, a in zip(stats, index)]
    assert sum(s < threshold for s in stats) == 1  # only the 5


def test_statistic_threshold_is_where_the_gamma_p_value_is_phi():
    from trigscan.detect import gamma_order_pvalue
    from trigscan.report import statistic_threshold

    r = [0.31, 0.35, 0.4, 0.28, 0.33, 0.37, 0.45, 0.3, 0.36, 0.9]
    fit = gamma_order_pvalue(r)
    entry = {"method": "lred", "targets": [],
             "per_class": [{"class": i, "statistic": s, "source": None} for i, s in enumerate(r)],
             "anomaly": {"kind": "gamma", "values": r, "threshold": 0.05, "side": "high",
                         "details": {"shape": fit["shape"], "scale": fit["scale"]}}}
    threshold = statistic_threshold(entry)
    assert max(r[:-1]) < threshold < r[-1]
    assert gamma_order_pvalue(r[:-1] + [threshold])["p_value"] == pytest.approx(0.05, abs=1e-6)


def test_image_folder_data(zoo_files, tmp_path, capsys):
    from PIL import Image

    test = read_npz(zoo_files["small"])
    for i, (x, y) in enumerate(zip(test["x"], test["y"])):
        (tmp_path / "imgs" / f"c{y}").mkdir(parents=True, exist_ok=True)
        Image.fromarray((x[0] * 255).round().astype(np.uint8), "L").save(tmp_path / "imgs" / f"c{y}" / f"{i}.png")
    model = zoo_files["root"] / "clean-cnn-grey-s0" / "model.pt"
    code, _, err = scan([model, "--data", tmp_path / "imgs", "--method", "nc", "--out", tmp_path / "out", *NC_TINY],
                        capsys)
    assert code in (0, 10), err
    data = json.loads((tmp_path / "out" / "report.json").read_text())["data"]
    assert data["format"] == "folder" and data["n"] == 20 and data["shape"] == [1, 24, 24]
    assert data["classes"] == [f"c{c}" for c in range(10)] and len(data["sha256"]) == 64


@pytest.mark.parametrize("in_scope, expected", [(True, 1), (False, 0)])
def test_demo_fails_only_on_misses_within_a_methods_kind(monkeypatch, capsys, in_scope, expected):
    import trigscan.demo

    results = {"nc": {"right": True, "in_scope": True}, "lred": {"right": False, "in_scope": in_scope}}
    monkeypatch.setattr(trigscan.demo, "run_demo",
                        lambda *a, **k: {"models": {"badnets": {"results": results}}})
    assert main(["demo"]) == expected
    assert ("badnets/lred" in capsys.readouterr().err) == in_scope


def test_demo_retrains_a_model_of_an_older_version_and_drops_its_scans(tmp_path, one_thread):
    """An upgrade bumps demo.VERSION: the cached model is retrained, and the
    finished scans of the old model must go with it (they would not match)."""
    from trigscan import demo

    folder = tmp_path / "clean"
    (folder / "report" / "results").mkdir(parents=True)
    (folder / "report" / "results" / "nc.json").write_text("{}")
    (folder / "truth.json").write_text(json.dumps({"version": demo.VERSION - 1}))
    truth = demo.build(folder, None)
    assert truth is not None and truth["version"] == demo.VERSION and not truth["backdoored"]
    assert not (folder / "report").exists()
    assert json.loads((folder / "truth.json").read_text())["version"] == demo.VERSION
    assert demo.build(folder, None) is None  # the current version is reused
