"""trigscan.zoo: triggers stamp what they claim, poisoning is as asked, quick-zoo
models are (or are not) backdoored, exports agree, builds are reproducible,
and `zoo eval` scores registered scanners."""
import json
import math

import numpy as np
import pytest
import torch

import trigscan.scanners as scanners
from trigscan.cli import main
from trigscan.data import digits, read_npz
from trigscan.result import Anomaly, ClassResult, ScanResult
from trigscan.zoo import (
    Blend, Patch, Rule, Sinusoid, SparseAdditive, SquareAdditive, build_model, poison, quick_specs, trigger_from_dict,
)
from trigscan.zoo.build import FAMILIES, check, load_data, shapes_specs
from trigscan.zoo.train import attack_success, confusion_into

GREY = torch.full((4, 1, 12, 12), 0.5)
RGB = torch.full((4, 3, 12, 12), 0.5)


# --- triggers -----------------------------------------------------------------

@pytest.mark.parametrize("x", [GREY, RGB])
def test_patch_fixed_position_replaces_exactly_the_block(x):
    out = Patch(3, (-4, 2), "checker").apply(x)
    changed = (out != x).any(1)  # [N, H, W]
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[8:11, 2:5] = True
    # checker: 1 on even (i + j), 0 on odd — both differ from 0.5
    assert torch.equal(changed, region.expand(4, 12, 12))
    assert out[0, 0, 8, 2] == 1 and out[0, 0, 8, 3] == 0 and out[0, 0, 9, 3] == 1
    assert torch.equal(x, torch.full_like(x, 0.5))  # input untouched
    assert Patch(3, (-4, 2)).region(12, 12) == (slice(8, 11), slice(2, 5))
    assert Patch(3, "random").region(12, 12) is None


def test_patch_patterns():
    solid = Patch(2, (0, 0), "solid").apply(RGB)
    assert torch.all(solid[:, :, :2, :2] == 1)
    rnd = Patch(4, (1, 1), "random", seed=3)
    block = rnd.apply(RGB)[:, :, 1:5, 1:5]
    assert torch.equal(block[0], rnd.block(3)) and torch.equal(block[0], block[3])
    assert not torch.equal(rnd.block(3), Patch(4, (1, 1), "random", seed=4).block(3))
    assert (block[0, 0] - block[0, 1]).abs().max() > 0  # colours differ per channel


def test_patch_random_position_moves_but_keeps_the_block():
    p = Patch(3, "random", "checker", seed=0)
    x = torch.full((64, 1, 12, 12), 0.5)
    out = p.apply(x, generator=torch.Generator().manual_seed(1))
    corners = set()
    for i in range(64):
        rows, cols = torch.nonzero((out[i, 0] != 0.5), as_tuple=True)
        r, c = rows.min().item(), cols.min().item()
        assert rows.max() - r == 2 and cols.max() - c == 2  # one 3x3 window ...
        assert torch.equal(out[i, :, r : r + 3, c : c + 3], p.block(1))  # ... holding the pattern
        corners.add((r, c))
    assert len(corners) > 20
    again = p.apply(x, generator=torch.Generator().manual_seed(1))
    assert torch.equal(out, again)


def test_blend_is_the_convex_mix():
    b = Blend(0.2, seed=1)
    x = digits(12, "test")[0][:8]
    p = b.pattern((1, 12, 12))
    assert torch.allclose(b.apply(x), 0.8 * x + 0.2 * p)
    assert p.std() > 0.2  # a noise pattern, not a constant


def test_sparse_additive_touches_n_pixels_by_amount():
    t = SparseAdditive(n_pixels=7, amount=0.25, seed=2)
    out = t.apply(RGB)
    diff = out - RGB
    moved = (diff != 0).any(1)
    assert int(moved[0].sum()) == 7 and torch.equal(moved[0], moved[3])
    assert torch.allclose(diff[diff != 0], torch.tensor(0.25))
    assert math.isclose(t.describe((3, 12, 12))["l2"], 0.25 * math.sqrt(7 * 3), rel_tol=1e-6)
    # spread over the whole image, not a block
    rows, cols = torch.nonzero(moved[0], as_tuple=True)
    assert (rows.max() - rows.min()) + (cols.max() - cols.min()) > 6
    # clipped to [0, 1]
    assert SparseAdditive(7, 0.25, seed=2).apply(torch.ones(1, 1, 12, 12)).max() == 1.0


def test_square_additive_raises_a_square_and_clips():
    t = SquareAdditive(size=3, amount=0.1, position=(2, 5))
    diff = t.apply(GREY) - GREY
    region = torch.zeros(12, 12, dtype=torch.bool)
    region[2:5, 5:8] = True
    assert torch.equal(diff[0, 0] != 0, region)
    assert torch.allclose(diff[0, 0][region], torch.tensor(0.1))
    assert math.isclose(t.describe((1, 12, 12))["l2"], 0.3, rel_tol=1e-6)
    assert t.apply(torch.full((1, 1, 12, 12), 0.95)).max() == 1.0


def test_sinusoid_is_a_horizontal_wave():
    t = Sinusoid(amount=0.2, frequency=3.0)
    diff = t.apply(GREY) - GREY
    assert torch.allclose(diff[0, 0, 0], diff[0, 0, 7])  # same in every row
    w = torch.arange(12, dtype=torch.float64)
    assert torch.allclose(diff[0, 0, 0].double(), 0.2 * torch.sin(2 * math.pi * 3 * w / 12), atol=1e-6)


@pytest.mark.parametrize("trigger", [
    Patch(3, (1, 2), "random", seed=5), Patch(2, "random"), Blend(0.1, seed=2),
    SparseAdditive(5, 0.3, seed=4), SquareAdditive(2, 0.2, (3, 3)), Sinusoid(0.3, 2.0),
])
def test_trigger_round_trips_through_json(trigger):
    again = trigger_from_dict(json.loads(json.dumps(trigger.to_dict())))
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    assert torch.equal(again.apply(RGB, generator=g()), trigger.apply(RGB, generator=g()))


def test_trigger_arguments_are_checked():
    with pytest.raises(ValueError, match="size"):
        Patch(0)
    with pytest.raises(ValueError, match="pattern"):
        Patch(3, pattern="stripes")
    with pytest.raises(ValueError, match="position"):
        Patch(3, position="centre")
    with pytest.raises(ValueError, match="position"):
        Patch(3, (11, 0)).apply(GREY)
    with pytest.raises(ValueError, match="alpha"):
        Blend(0.0)
    with pytest.raises(ValueError, match="amount"):
        SquareAdditive(amount=2.0)
    with pytest.raises(ValueError, match="n_pixels"):
        SparseAdditive(n_pixels=1000).apply(GREY)
    with pytest.raises(TypeError, match="x"):
        Blend(0.1).apply(np.zeros((1, 1, 4, 4)))
    with pytest.raises(ValueError, match="kind"):
        trigger_from_dict({"kind": "glitter"})


# --- poisoning ----------------------------------------------------------------

@pytest.fixture(scope="module")
def train_set():
    return digits(12, "train")


def test_poison_rate_labels_and_pixels(train_set):
    x, y = train_set
    trig = Patch(3, (-4, -4))
    p = poison(x, y, [Rule(trig, target=0, rate=0.1)], seed=0)
    n = len(y)
    assert len(p.poisoned) == round(0.1 * n)
    assert abs(len(p.poisoned) / n - 0.1) < 1 / n
    idx = torch.from_numpy(p.poisoned)
    assert torch.all(p.y[idx] == 0) and torch.all(y[idx] != 0)  # dirty label: victims relabelled
    assert torch.equal(p.x[idx], trig.apply(x[idx]))
    rest = torch.ones(n, dtype=torch.bool)
    rest[idx] = False
    assert torch.equal(p.x[rest], x[rest]) and torch.equal(p.y[rest], y[rest])
    again = poison(x, y, [Rule(trig, target=0, rate=0.1)], seed=0)
    assert np.array_equal(again.poisoned, p.poisoned)
    assert not np.array_equal(poison(x, y, [Rule(trig, target=0, rate=0.1)], seed=1).poisoned, p.poisoned)


def test_poison_source_specific_with_cover(train_set):
    x, y = train_set
    rule = Rule(Patch(3, (1, 1)), target=9, rate=0.05, sources=(1, 7), cover_rate=0.04)
    p = poison(x, y, [rule], seed=0)
    assert len(p.poisoned) == round(0.05 * len(y)) and len(p.cover) == round(0.04 * len(y))
    assert set(y[torch.from_numpy(p.poisoned)].tolist()) <= {1, 7}
    cover = torch.from_numpy(p.cover)
    assert not set(y[cover].tolist()) & {1, 7, 9}
    assert torch.equal(p.y[cover], y[cover])  # cover images keep their label ...
    assert torch.equal(p.x[cover], rule.trigger.apply(x[cover]))  # ... but carry the trigger
    assert not np.intersect1d(p.poisoned, p.cover).size


def test_poison_several_rules_and_clean_label(train_set):
    x, y = train_set
    rules = [Rule(Patch(3, (1, 1)), target=2, rate=0.05), Rule(Blend(0.2), target=5, rate=0.05),
             Rule(Sinusoid(0.2, 3.0), target=6, rate=0.05, clean_label=True)]
    p = poison(x, y, rules, seed=3)
    assert len(np.unique(p.poisoned)) == len(p.poisoned)  # no image poisoned twice
    for i, r in enumerate(rules):
        idx = torch.from_numpy(p.poisoned[p.rule_of == i])
        assert len(idx) == round(0.05 * len(y))
        assert torch.all(p.y[idx] == r.target)
        assert torch.equal(p.x[idx], r.trigger.apply(x[idx]))
        if r.clean_label:
            assert torch.all(y[idx] == r.target)  # only target images, labels unchanged
        else:
            assert torch.all(y[idx] != r.target)


def test_poison_errors(train_set):
    x, y = train_set
    with pytest.raises(ValueError, match=r"rules\[0\].rate"):
        poison(x, y, [Rule(Patch(), target=3, rate=0.5, clean_label=True)])
    with pytest.raises(ValueError, match="rate"):
        Rule(Patch(), target=1, rate=1.5)
    with pytest.raises(ValueError, match="sources"):
        Rule(Patch(), target=1, sources=(1, 2))
    with pytest.raises(ValueError, match="cover_rate"):
        Rule(Patch(), target=1, cover_rate=0.1)


def test_check_flags_weak_or_costly_backdoors():
    clean = [{"name": f"c{i}", "backdoored": False, "arch": "cnn", "data": "digits", "clean_accuracy": a}
             for i, a in enumerate((0.96, 0.98))]
    good = {"name": "good", "backdoored": True, "arch": "cnn", "data": "digits", "clean_accuracy": 0.95, "asr": 0.95}
    weak = dict(good, name="weak", asr=0.85)
    costly = dict(good, name="costly", clean_accuracy=0.93)
    orphan = dict(good, name="orphan", arch="resnet")
    failures = check(clean + [good, weak, costly, orphan])
    assert [f.split(":")[0] for f in failures] == ["weak", "costly", "orphan"]


# --- the quick zoo --------------------------------------------------------------

def _load(folder):
    model = torch.jit.load(str(folder / "model.pt"))
    test = read_npz(folder / "test.npz")
    return model.eval(), torch.from_numpy(test["x"]), torch.from_numpy(test["y"])


def test_quick_zoo_layout_and_checks(quick_zoo):
    root, index = quick_zoo
    assert index["failures"] == []
    names = [t["name"] for t in index["models"]]
    assert names == [s.name for s in quick_specs()]
    assert sum(t["backdoored"] for t in index["models"]) == 3
    for name in names:
        for f in ("model.pt", "model.onnx", "train.npz", "test.npz", "truth.json"):
            assert (root / name / f).is_file()
    assert json.loads((root / "zoo.json").read_text())["models"] == index["models"]
    # each trigger on the clean models: close to their natural confusion, far from the backdoor's ASR
    assert sorted(index["control_asr"]) == sorted(t["name"] for t in index["models"] if t["backdoored"])
    assert all(0.0 <= v < 0.1 for v in index["control_asr"].values())


@pytest.mark.slow
def test_quick_zoo_backdoors_work_and_clean_models_do_not_have_them(quick_zoo):
    root, index = quick_zoo
    truths = {t["name"]: t for t in index["models"]}
    badnets = Rule(trigger_from_dict(truths["badnets-cnn-grey"]["rules"][0]["trigger"]), target=0)
    for name, truth in truths.items():
        model, x, y = _load(root / name)
        acc = (model(x).argmax(1) == y).float().mean().item()
        assert acc == pytest.approx(truth["clean_accuracy"]) and acc > 0.9
        if truth["backdoored"]:
            for r in truth["rules"]:
                rule = Rule(trigger_from_dict(r["trigger"]), target=r["target"])
                assert attack_success(model, x, y, rule) >= 0.9  # measured here, not read from the truth
        else:
            # the BadNets trigger on a clean model: about the natural confusion rate into class 0
            asr = attack_success(model, x, y, badnets)
            natural = confusion_into(model, x, y, 10)[0]
            assert asr < 0.1 and abs(asr - natural) < 0.05


def test_training_set_records_the_poisoning(quick_zoo):
    root, index = quick_zoo
    truth = next(t for t in index["models"] if t["name"] == "sparse-additive-cnn-grey")
    train = read_npz(root / truth["name"] / "train.npz")
    xtr, ytr = digits(24, "train")
    assert np.array_equal(train["y_true"], ytr.numpy())
    idx = train["poisoned"]
    assert len(idx) == round(truth["rules"][0]["rate"] * len(ytr)) and truth["poison_rate"] == len(idx) / len(ytr)
    assert np.all(train["y"][idx] == truth["targets"][0])
    trig = trigger_from_dict(truth["rules"][0]["trigger"])
    assert np.array_equal(train["x"][idx], trig.apply(xtr[idx]).numpy())
    others = np.setdiff1d(np.arange(len(ytr)), idx)
    assert np.array_equal(train["x"][others], xtr[others].numpy())
    assert truth["rules"][0]["trigger_stats"]["l2"] == pytest.approx(math.sqrt(20) * 0.25, rel=1e-5)


def test_onnx_matches_torchscript(quick_zoo):
    import onnxruntime as ort

    root, _ = quick_zoo
    model, x, _ = _load(root / "blend-cnn-grey")
    session = ort.InferenceSession(str(root / "blend-cnn-grey" / "model.onnx"), providers=["CPUExecutionProvider"])
    batch = x[:37]
    got = session.run(None, {"images": batch.numpy()})[0]
    with torch.no_grad():
        want = model(batch).numpy()
    assert got.shape == (37, 10)
    assert np.abs(got - want).max() < 1e-4


def test_rebuild_is_identical(quick_zoo, tmp_path):
    """Rebuilding a model in this process reproduces what the zoo's worker process wrote:
    the same data bytes, the same ONNX bytes and the same TorchScript weights."""
    root, index = quick_zoo
    spec = next(s for s in quick_specs() if s.name == "badnets-cnn-grey")
    truth = build_model(spec, tmp_path / spec.name)
    old = next(t for t in index["models"] if t["name"] == spec.name)
    assert truth["weights_sha256"] == old["weights_sha256"]
    for f in ("train.npz", "test.npz", "model.onnx"):
        assert (tmp_path / spec.name / f).read_bytes() == (root / spec.name / f).read_bytes(), f
    # TorchScript archives are not byte-stable across processes (a random
    # serialization id; constants in hash order), so compare what they hold
    a = torch.jit.load(str(tmp_path / spec.name / "model.pt")).state_dict()
    b = torch.jit.load(str(root / spec.name / "model.pt")).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_build_skips_complete_models_and_cli_prints_figures(quick_zoo, capsys):
    root, _ = quick_zoo
    stamp = (root / "blend-cnn-grey" / "model.pt").stat().st_mtime_ns
    assert main(["zoo", "build", str(root), "--quick", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (root / "blend-cnn-grey" / "model.pt").stat().st_mtime_ns == stamp  # not rebuilt
    index = json.loads((root / "zoo.json").read_text())
    assert all(t.get("reused") for t in index["models"])
    assert index["command"] == f"trigscan zoo build {root} --quick --quiet"
    for t in index["models"]:
        assert t["name"] in out and f"{t['clean_accuracy']:.1%}" in out
    assert "all backdoored models: ASR >= 90%" in out


def test_shapes_family_specs():
    specs = shapes_specs()
    names = [s.name for s in specs]
    assert len(set(names)) == len(names) == 20 and FAMILIES["shapes"] is shapes_specs
    assert all(s.data == "shapes" and s.to_dict()["size"] == 32 and s.to_dict()["epochs"] == 20 for s in specs)
    clean = [s for s in specs if not s.backdoored]
    assert len(clean) == 8 and len({s.seed for s in specs}) == 20
    patches = [s for s in specs if s.attack.startswith("badnets")]
    assert len(patches) == 9 and len({s.rules[0].target for s in patches}) == 6
    x = torch.full((2, 3, 32, 32), 0.5)
    for s in specs:  # every trigger fits the 32x32 images and changes them
        for r in s.rules:
            assert not torch.equal(r.attack_trigger.apply(x), x)
    # the digits zoo's specs keep their 24x24 size (built zoos stay valid)
    assert {s.to_dict()["size"] for s in FAMILIES["standard"]()} == {24}
    xte, yte = load_data("shapes", "test")
    assert xte.shape == (1000, 3, 32, 32) and torch.equal(torch.bincount(yte), torch.full((10,), 100))


def test_cli_reports_bad_arguments(tmp_path, capsys):
    assert main(["zoo", "build", str(tmp_path), "--quick", "--only", "no-such-model"]) == 2
    assert "only: unknown model(s) ['no-such-model']" in capsys.readouterr().err
    assert main(["zoo", "eval", str(tmp_path / "nothing"), "--method", "x"]) == 2
    assert "not a folder" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["zoo", "build", str(tmp_path), "--family", "cifar"])
    assert "invalid choice: 'cifar'" in capsys.readouterr().err


# --- zoo eval with stand-in scanners --------------------------------------------

class _PatchVote:
    """Stand-in scanner: stamps the quick zoo's BadNets patch and flags the class
    that most stamped images land in, when it takes more than half of them."""

    access = "white"
    needs_labels = False
    seen: list = []

    def __init__(self, share: float = 0.5):
        self.share = share

    def scan(self, model, images, labels=None, seed=0):
        type(self).seen.append((len(images), labels is not None))
        with torch.no_grad():
            pred = torch.as_tensor(model(Patch(3, (-4, -4), "checker").apply(images))).argmax(1)
        frac = torch.bincount(pred, minlength=10).float() / len(pred)
        top = int(frac.argmax())
        flagged = bool(frac[top] > self.share)
        on_patch = torch.zeros(1, 24, 24)  # its "trigger": the patch it stamps, for every class
        on_patch[0, 20:23, 20:23] = 1.0
        per_class = [ClassResult(target=k, statistic=float(frac[k]), asr=float(frac[k]), converged=True, steps=0,
                                 trigger={"mask": on_patch}) for k in range(10)]
        return ScanResult(method="patch-vote", backdoored=flagged, targets=[top] if flagged else [],
                          per_class=per_class, anomaly=Anomaly("mad", frac.tolist(), self.share, side="high"),
                          config={"share": self.share}, seed=seed, elapsed_s=0.0)


class _NoiseVote(_PatchVote):
    """Stand-in for a scanner that makes its own inputs (B3D-SS): takes no images."""

    uses_images = False

    def scan(self, model, images, labels=None, seed=0):
        type(self).seen.append((images, labels))
        return super().scan(model, torch.rand(20, 1, 24, 24), None, seed)


@pytest.fixture
def fake_scanners():
    names = {"patch-vote": (_PatchVote, {}), "patch-vote-labels": (_PatchVote, {"needs_labels": True}),
             "patch-vote-train": (_PatchVote, {"uses_training_set": True}),
             "patch-vote-black": (_PatchVote, {"access": "black"}),
             "patch-vote-noise": (_NoiseVote, {})}
    for name, (base, attrs) in names.items():
        scanners.register(name)(type(name.replace("-", "_"), (base,), dict(attrs)))
    yield list(names)
    for name in names:
        scanners._REGISTRY.pop(name, None)


def test_zoo_eval_table_and_json(quick_zoo, fake_scanners, tmp_path, capsys):
    root, index = quick_zoo
    out = tmp_path / "eval.json"
    _PatchVote.seen.clear()
    assert main(["zoo", "eval", str(root), "--method", "patch-vote", "--method", "patch-vote-labels",
                 "--method", "patch-vote-train", "--option", "patch-vote.share=0.6", "--images", "50",
                 "--out", str(out), "--quiet"]) == 0
    table = capsys.readouterr().out
    report = json.loads(out.read_text())
    n_train = index["models"][0]["n_train"]
    # the labelled clean test subset for every scanner (L-RED's few images per class come
    # from it), the (poisoned) training set only for scanners that inspect it
    assert _PatchVote.seen == [(50, True)] * 10 + [(n_train, True)] * 5
    assert report["options"] == {"patch-vote": {"share": 0.6}}
    rows = {(r["method"], r["model"]): r for r in report["rows"]}
    for method in ("patch-vote", "patch-vote-labels", "patch-vote-train"):
        # it finds the BadNets backdoor (target 0) and nothing else
        assert rows[method, "badnets-cnn-grey"]["found"] == [0] and rows[method, "badnets-cnn-grey"]["correct"]
        for name in ("clean-cnn-grey-s0", "clean-cnn-grey-s1"):
            assert rows[method, name]["verdict"] is False and rows[method, name]["correct"]
        for name in ("blend-cnn-grey", "sparse-additive-cnn-grey"):
            assert not rows[method, name]["correct"]
        s = report["summary"][method]
        assert (s["accuracy"], s["detected_with_target"], s["backdoored"], s["false_positives"], s["clean"]) == (
            pytest.approx(3 / 5), 1, 3, 0, 2)
        assert f"{method}: accuracy 60.0%" in table
    assert rows["patch-vote", "badnets-cnn-grey"]["statistic"]["true_targets"]["0"][0] > 0.9
    assert "badnets-cnn-grey" in table and "bd->0" in table
    # its trigger is the true patch: scored as all on it, for the one fixed-position patch model
    assert rows["patch-vote", "badnets-cnn-grey"]["trigger_overlap"] == {"0": {"share": 1.0, "peak_on_patch": True}}
    assert all(rows["patch-vote", name]["trigger_overlap"] == {}
               for name in ("clean-cnn-grey-s0", "blend-cnn-grey", "sparse-additive-cnn-grey"))
    assert report["summary"]["patch-vote"]["patch_triggers"] == 1
    assert "trigger on the true patch (1 fixed-position patch backdoors): median share 100%" in table


def _overlap(trigger, rule_trigger=None, target=3):
    from trigscan.zoo.evaluate import trigger_overlap
    result = ScanResult(method="x", backdoored=True, targets=[target], seed=0, elapsed_s=0.0, config={},
                        anomaly=Anomaly("mad", [0.0], 2.0), per_class=[
                            ClassResult(target=k, statistic=0.0, asr=1.0, converged=True, steps=1,
                                        trigger=trigger if k == target else {}) for k in range(5)])
    rule = {"trigger": (rule_trigger or Patch(3, (-4, -4))).to_dict(), "target": target}
    return trigger_overlap(result, {"input_shape": [2, 12, 12], "rules": [rule]})


def test_trigger_overlap_scores_where_the_recovered_trigger_acts():
    mask = torch.zeros(1, 12, 12)
    mask[0, 8:11, 8:11] = 0.5                       # the true patch, rows/cols 8..10
    mask[0, 0, :3] = 0.5                            # and three pixels elsewhere
    assert _overlap({"mask": mask}) == {"3": {"share": 0.75, "peak_on_patch": True}}
    off = torch.zeros(1, 12, 12)
    off[0, 8, 8], off[0, 0, 0] = 0.2, 0.8           # the peak is off the patch
    assert _overlap({"mask": off}) == {"3": {"share": pytest.approx(0.2), "peak_on_patch": False}}
    # PixelBackdoor: |positive - negative| summed over channels; L-RED: |perturbation|
    pos, neg = torch.zeros(2, 12, 12), torch.zeros(2, 12, 12)
    pos[0, 9, 9], neg[1, 9, 9], neg[0, 1, 1] = 0.3, 0.3, 0.2
    assert _overlap({"positive": pos, "negative": neg})["3"]["share"] == pytest.approx(0.75)
    assert _overlap({"perturbation": pos - neg})["3"]["share"] == pytest.approx(0.75)
    # nothing recovered: share 0, no peak; no entry for triggers without a fixed patch
    assert _overlap({"mask": torch.zeros(1, 12, 12)}) == {"3": {"share": 0.0, "peak_on_patch": False}}
    assert _overlap({"mask": mask}, Patch(3, "random")) == {}
    assert _overlap({"mask": mask}, Blend(0.2)) == {}
    assert _overlap({"weights": torch.ones(5)}) == {}


def test_zoo_eval_only_scans_the_named_models(quick_zoo, fake_scanners, tmp_path, capsys):
    root, _ = quick_zoo
    out = tmp_path / "only.json"
    assert main(["zoo", "eval", str(root), "--method", "patch-vote", "--only", "badnets-cnn-grey", "clean-cnn-grey-s1",
                 "--out", str(out), "--quiet"]) == 0
    report = json.loads(out.read_text())
    assert [r["model"] for r in report["rows"]] == ["clean-cnn-grey-s1", "badnets-cnn-grey"]  # zoo order
    assert report["summary"]["patch-vote"]["models"] == 2
    capsys.readouterr()
    assert main(["zoo", "eval", str(root), "--method", "patch-vote", "--only", "no-such-model", "--quiet"]) == 2
    assert "only: model(s) ['no-such-model'] are not built" in capsys.readouterr().err


def test_zoo_eval_gives_no_images_to_scanners_that_make_their_own(quick_zoo, fake_scanners):
    from trigscan.zoo.evaluate import evaluate

    root, _ = quick_zoo
    _PatchVote.seen.clear()
    report = evaluate(root, ["patch-vote-noise"], n_images=20, quiet=True)
    assert not any(r["error"] for r in report["rows"])
    assert _PatchVote.seen[::2] == [(None, None)] * 5  # (then its own 20 noise images, unlabelled)
    assert scanners.scan_data(scanners.get("b3d-ss")) == "none"
    assert scanners.scan_data(scanners.get("dtinspector")) == "training"
    assert scanners.scan_data(scanners.get("lred")) == scanners.scan_data(scanners.get("nc")) == "clean"


def test_zoo_eval_black_box_needs_load_model(quick_zoo, fake_scanners):
    import trigscan
    from trigscan.zoo.evaluate import evaluate

    root, _ = quick_zoo
    report = evaluate(root, ["patch-vote-black"], n_images=20, quiet=True)
    if hasattr(trigscan, "load_model"):  # the model reached the scanner
        assert not any("does not provide" in (r["error"] or "") for r in report["rows"])
    else:
        assert all("load_model" in r["error"] for r in report["rows"])
    with pytest.raises(ValueError, match="bad options"):
        evaluate(root, ["patch-vote"], options={"patch-vote": {"nonsense": 1}})
    with pytest.raises(ValueError, match="unknown scanner"):
        evaluate(root, ["no-such-method"])
