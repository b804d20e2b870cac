"""trigscan.data: embedded datasets, the npz writer and the loaders' validation."""
import hashlib

import numpy as np
import pytest
import torch
from PIL import Image

from trigscan.data import (
    balanced_subset, color_digits, digits, load_image_folder, load_npz, noise, read_npz, save_npz, shapes, split_indices,
)
from trigscan.data.shapes import CLASS_NAMES


@pytest.mark.parametrize("size", [8, 16, 24, 32])
def test_digits_shape_range_and_split(size):
    x, y = digits(size, "all")
    assert x.shape == (1797, 1, size, size) and x.dtype == torch.float32
    assert y.dtype == torch.int64 and set(y.tolist()) == set(range(10))
    assert 0.0 <= x.min() and x.max() <= 1.0 and x.max() > 0.9  # real ink reaches white
    xtr, ytr = digits(size, "train")
    xte, yte = digits(size, "test")
    assert len(ytr) + len(yte) == 1797
    assert abs(len(yte) / 1797 - 0.25) < 0.01
    # stratified: every class has about a quarter of its images in test
    for c in range(10):
        frac = (yte == c).sum().item() / (y == c).sum().item()
        assert abs(frac - 0.25) < 0.02


def test_digits_resize_keeps_the_original_at_native_size():
    from sklearn.datasets import load_digits

    x, _ = digits(8, "all")
    assert torch.equal(x[:, 0], torch.from_numpy(load_digits().images.astype(np.float32) / 16))


def test_split_is_disjoint_and_fixed_by_seed():
    y = digits(8, "all")[1].numpy()
    tr, te = split_indices(y, 0.25, seed=0)
    assert len(np.intersect1d(tr, te)) == 0 and len(tr) + len(te) == len(y)
    assert np.array_equal(te, split_indices(y, 0.25, seed=0)[1])
    assert not np.array_equal(te, split_indices(y, 0.25, seed=1)[1])


def test_color_digits_match_grey_digits():
    xg, yg = digits(24, "test")
    xc, yc = color_digits(24, "test")
    assert xc.shape == (len(yg), 3, 24, 24) and torch.equal(yc, yg)
    assert 0.0 <= xc.min() and xc.max() <= 1.0
    # the digit is where the grey ink is: its colour differs from the surrounding photo
    ink = xg[:, 0] > 0.7
    bg = xg[:, 0] < 0.05
    contrast = [(xc[i][:, ink[i]].mean(1) - xc[i][:, bg[i]].mean(1)).abs().max() for i in range(50)]
    assert min(contrast) > 0.1
    # channels really differ (not grey copies)
    assert (xc[:, 0] - xc[:, 1]).abs().mean() > 0.02


def test_noise_is_uniform_and_seeded():
    a = noise(200, (3, 8, 8), seed=1)
    assert a.shape == (200, 3, 8, 8) and a.dtype == torch.float32
    assert 0.0 <= a.min() and a.max() < 1.0 and abs(a.mean().item() - 0.5) < 0.02
    assert torch.equal(a, noise(200, (3, 8, 8), seed=1))
    assert not torch.equal(a, noise(200, (3, 8, 8), seed=2))
    with pytest.raises(ValueError, match="shape"):
        noise(3, (8, 8))
    with pytest.raises(ValueError, match="n"):
        noise(0)


def test_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="size"):
        digits(2)
    with pytest.raises(ValueError, match="split"):
        digits(24, "validation")
    with pytest.raises(ValueError, match="test_fraction"):
        digits(24, "train", test_fraction=1.5)


def test_shapes_shape_range_and_balance():
    x, y = shapes(32, "train", per_class=4)
    assert x.shape == (40, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert 0.0 <= x.min() and x.max() <= 1.0
    assert torch.equal(torch.bincount(y), torch.full((10,), 4))
    assert len(CLASS_NAMES) == 10
    grey, _ = shapes(16, "test", per_class=2, channels=1)
    assert grey.shape == (20, 1, 16, 16)
    # every image is its own: no two alike
    assert len({hashlib.sha256(im.numpy().tobytes()).hexdigest() for im in x}) == 40


def test_shapes_image_depends_only_on_seed_split_and_index():
    x5, y5 = shapes(24, "train", seed=3, per_class=5)
    x2, y2 = shapes(24, "train", seed=3, per_class=2)
    assert torch.equal(x5[:20], x2) and torch.equal(y5[:20], y2)
    assert torch.equal(x2, shapes(24, "train", seed=3, per_class=2)[0])
    assert not torch.equal(x2, shapes(24, "test", seed=3, per_class=2)[0])
    assert not torch.equal(x2, shapes(24, "train", seed=4, per_class=2)[0])
    # callers may scribble on what they get without changing the next call's images
    x2.zero_()
    assert shapes(24, "train", seed=3, per_class=2)[0].max() > 0


def test_shapes_stripe_classes_run_the_way_their_label_says():
    x, y = shapes(32, "train", per_class=30, channels=1)
    def edges(label):  # mean |vertical step| and |horizontal step| over the class
        im = x[y == label, 0]
        return (im[:, 1:] - im[:, :-1]).abs().mean().item(), (im[:, :, 1:] - im[:, :, :-1]).abs().mean().item()
    down, across = edges(CLASS_NAMES.index("h-stripes"))
    assert down > 1.5 * across  # horizontal lines change going down
    down, across = edges(CLASS_NAMES.index("v-stripes"))
    assert across > 1.5 * down


def test_shapes_bad_arguments_name_themselves():
    with pytest.raises(ValueError, match="split"):
        shapes(32, "all")
    with pytest.raises(ValueError, match="size"):
        shapes(4)
    with pytest.raises(ValueError, match="channels"):
        shapes(32, channels=2)
    with pytest.raises(ValueError, match="per_class"):
        shapes(32, per_class=0)


def test_balanced_subset():
    y = digits(8, "test")[1].numpy()
    idx = balanced_subset(y, 100, seed=0)
    assert len(idx) == 100 and len(set(idx)) == 100
    assert np.all(np.bincount(y[idx], minlength=10) == 10)
    assert np.array_equal(idx, balanced_subset(y, 100, seed=0))
    assert not np.array_equal(idx, balanced_subset(y, 100, seed=1))
    assert len(balanced_subset(y, 10_000)) == len(y)


def test_save_npz_is_byte_identical_and_round_trips(tmp_path):
    x, y = digits(16, "test")
    save_npz(tmp_path / "a.npz", x=x, y=y)
    save_npz(tmp_path / "b.npz", x=x, y=y)
    a, b = (tmp_path / "a.npz").read_bytes(), (tmp_path / "b.npz").read_bytes()
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest()
    x2, y2 = load_npz(tmp_path / "a.npz")
    assert torch.equal(x2, x) and torch.equal(y2, y)
    assert not list(tmp_path.glob("*.tmp"))  # the atomic write left no temporary behind


def test_load_npz_accepts_uint8(tmp_path):
    x = np.arange(2 * 3 * 4 * 4, dtype=np.uint8).reshape(2, 3, 4, 4)
    np.savez(tmp_path / "u.npz", x=x, y=np.array([0, 1]))
    xs, ys = load_npz(tmp_path / "u.npz")
    assert xs.dtype == torch.float32 and torch.allclose(xs, torch.from_numpy(x / 255.0).float())
    assert ys.tolist() == [0, 1]


GOOD_X = np.full((3, 1, 4, 4), 0.5, dtype=np.float32)
GOOD_Y = np.array([0, 1, 2])


@pytest.mark.parametrize(
    "arrays, message",
    [
        ({"y": GOOD_Y}, "missing array"),
        ({"x": GOOD_X}, "missing array"),
        ({"x": GOOD_X[:, 0], "y": GOOD_Y}, "4 axes"),
        ({"x": np.full((3, 4, 4, 3), 0.5, np.float32), "y": GOOD_Y}, "channels-last"),
        ({"x": np.where(np.arange(48).reshape(3, 1, 4, 4) == 5, np.nan, 0.5).astype(np.float32), "y": GOOD_Y}, "NaN"),
        ({"x": GOOD_X * 255, "y": GOOD_Y}, r"\[0, 1\]"),
        ({"x": GOOD_X - 1, "y": GOOD_Y}, r"\[0, 1\]"),
        ({"x": GOOD_X.astype(np.int32), "y": GOOD_Y}, "dtype int32"),
        ({"x": GOOD_X, "y": GOOD_Y[:2]}, "3 images but y has 2"),
        ({"x": GOOD_X, "y": GOOD_Y.astype(np.float32)}, "integer class labels"),
        ({"x": GOOD_X, "y": GOOD_Y[:, None]}, "one axis"),
        ({"x": GOOD_X, "y": np.array([0, -1, 2])}, ">= 0"),
        ({"x": GOOD_X[:0], "y": GOOD_Y[:0]}, "no images"),
    ],
)
def test_load_npz_rejects_malformed_files(tmp_path, arrays, message):
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)
    with pytest.raises(ValueError, match=message) as err:
        load_npz(path)
    assert str(path) in str(err.value)  # the error names the file


def test_load_npz_refuses_pickles_and_non_npz(tmp_path):
    path = tmp_path / "obj.npz"
    np.savez(path, x=np.array([{"a": 1}], dtype=object), y=GOOD_Y)
    with pytest.raises(ValueError, match="pickled"):
        load_npz(path)
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip at all")
    with pytest.raises(ValueError, match="not a readable .npz"):
        load_npz(junk)
    with pytest.raises(ValueError, match="no such file"):
        read_npz(tmp_path / "missing.npz")
    with pytest.raises(TypeError, match="object arrays"):
        save_npz(tmp_path / "o.npz", x=np.array([None], dtype=object))


def _write_folder(root, sizes=((6, 5),), mode="RGB"):
    rng = np.random.default_rng(0)
    for cls in ("cat", "ant"):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            shape = (h, w, 3) if mode == "RGB" else (h, w)
            Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8)).save(root / cls / f"{i}.png")


def test_load_image_folder(tmp_path):
    _write_folder(tmp_path, sizes=((6, 5), (6, 5)))
    x, y, classes = load_image_folder(tmp_path)
    assert classes == ["ant", "cat"] and y.tolist() == [0, 0, 1, 1]
    assert x.shape == (4, 3, 6, 5) and x.dtype == torch.float32
    first = np.asarray(Image.open(tmp_path / "ant" / "0.png"), dtype=np.float32) / 255
    assert torch.allclose(x[0], torch.from_numpy(first).permute(2, 0, 1))
    xs, _, _ = load_image_folder(tmp_path, size=8, channels=1)
    assert xs.shape == (4, 1, 8, 8)


def test_load_image_folder_greyscale(tmp_path):
    _write_folder(tmp_path, mode="L")
    x, _, _ = load_image_folder(tmp_path)
    assert x.shape[1] == 1


def test_load_image_folder_errors(tmp_path):
    with pytest.raises(ValueError, match="not a folder"):
        load_image_folder(tmp_path / "nope")
    with pytest.raises(ValueError, match="no class subfolders"):
        load_image_folder(tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no images") as err:
        load_image_folder(tmp_path)
    assert "empty" in str(err.value)

    mixed = tmp_path / "mixed"
    _write_folder(mixed, sizes=((6, 5), (7, 7)))
    with pytest.raises(ValueError, match="different sizes"):
        load_image_folder(mixed)
    assert load_image_folder(mixed, size=(4, 4))[0].shape == (4, 3, 4, 4)

    broken = tmp_path / "broken"
    _write_folder(broken)
    (broken / "cat" / "bad.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="bad.png: cannot be read"):
        load_image_folder(broken)
    with pytest.raises(ValueError, match="channels"):
        load_image_folder(mixed, channels=2)
