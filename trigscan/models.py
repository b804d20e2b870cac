"""Model adapters: what a scanner sees of the model under inspection.

A white-box model is an ``nn.Module`` (or TorchScript module) mapping images in
[0, 1] to logits; normalisation (mean/std) is applied here, never by a scanner.
Outputs are checked at the boundary, so a model that returns the wrong shape or
NaN fails with a clear error instead of silently poisoning a scan.
"""
from __future__ import annotations

import contextlib
import io
import os
import time
import warnings
from pathlib import Path
from typing import Sequence

import torch
from torch import nn


class ModelError(RuntimeError):
    """The model under inspection raised or returned something unusable."""


def _as_channel_tensor(values, name: str, channels: int) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float32).flatten()
    if t.numel() not in (1, channels):
        raise ValueError(f"{name}: expected 1 or {channels} values, got {t.numel()}")
    if not torch.isfinite(t).all():
        raise ValueError(f"{name}: values must be finite, got {t.tolist()}")
    return t.view(1, -1, 1, 1)


class WhiteBoxModel(nn.Module):
    """Wraps a module that maps normalised images to logits.

    mean/std: per-channel normalisation applied to [0, 1] images before the module.
    optimize: scan a faster copy of a TorchScript module on the CPU
        (:meth:`for_scanning`); default True unless the environment sets
        ``TRIGSCAN_FAST_COPY=0``. False scans the module exactly as given.
    """

    access = "white"

    def __init__(self, module: nn.Module, mean: Sequence[float] | None = None,
                 std: Sequence[float] | None = None, *, optimize: bool | None = None):
        super().__init__()
        if optimize is None:  # the environment decides for CLI runs: TRIGSCAN_FAST_COPY=0 scans models as given
            optimize = os.environ.get("TRIGSCAN_FAST_COPY", "1") != "0"
        if not isinstance(optimize, bool):
            raise TypeError(f"optimize: expected True or False, got {optimize!r}")
        self.optimize = optimize
        if not isinstance(module, nn.Module):
            raise TypeError(f"model: expected an nn.Module or TorchScript module, got {type(module).__name__}")
        if std is not None and any(float(s) <= 0 for s in torch.as_tensor(std).flatten()):
            raise ValueError(f"std: must be > 0, got {std}")
        self.module = module.eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self._mean, self._std = mean, std
        self.num_classes: int | None = None

    def for_scanning(self, images: torch.Tensor) -> tuple["WhiteBoxModel", str | None]:
        """The model a scan runs: with ``optimize`` a TorchScript module on the CPU is
        replaced by a faster copy of it (see :func:`fast_cpu_copy`), checked on
        ``images`` to give the same classes and logits within 1e-3 of their
        range; otherwise this model as it is. Returns (model, note): the note
        says why a copy was not used, when one was tried."""
        if not self.optimize or not isinstance(self.module, torch.jit.ScriptModule) or self.device.type != "cpu":
            return self, None
        with torch.no_grad():
            want = self(images)
        try:
            fast = WhiteBoxModel(fast_cpu_copy(self.module), self._mean, self._std, optimize=False)
            fast.num_classes = self.num_classes
            with torch.no_grad():
                got = fast(images)
        except Exception as exc:  # freezing is an optimisation: never a reason to fail a scan
            return self, f"model: scanned as given; its frozen copy failed ({type(exc).__name__}: {exc})"
        scale = float(want.abs().max()) + 1.0
        if not torch.equal(want.argmax(1), got.argmax(1)) or float((want - got).abs().max()) > 1e-3 * scale:
            return self, "model: scanned as given; its frozen copy gave different scores"
        return fast, None

    @property
    def device(self) -> torch.device:
        for tensor in list(self.module.parameters()) + list(self.module.buffers()):
            return tensor.device
        return torch.device("cpu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._mean is not None:
            x = x - _as_channel_tensor(self._mean, "mean", x.shape[1]).to(x.device)
        if self._std is not None:
            x = x / _as_channel_tensor(self._std, "std", x.shape[1]).to(x.device)
        try:
            out = self.module(x)
        except Exception as exc:  # the model is untrusted: report, don't crash
            raise ModelError(
                f"model raised {type(exc).__name__} on a batch of shape {tuple(x.shape)}: {exc}"
            ) from exc
        return check_logits(out, x.shape[0], self.num_classes)

    def probe(self, images: torch.Tensor) -> int:
        """Run the model on a couple of images; learn and return the class count."""
        with torch.no_grad():
            out = self(images[:2].to(self.device))
        if out.shape[1] < 2:
            raise ModelError(f"model returns {out.shape[1]} class score(s); a classifier needs >= 2")
        self.num_classes = int(out.shape[1])
        return self.num_classes


def check_logits(out, batch: int, num_classes: int | None) -> torch.Tensor:
    if not isinstance(out, torch.Tensor):
        raise ModelError(f"model returned {type(out).__name__}, expected a tensor of class scores")
    if out.dim() != 2 or out.shape[0] != batch:
        raise ModelError(f"model returned shape {tuple(out.shape)}, expected [{batch}, classes]")
    if num_classes is not None and out.shape[1] != num_classes:
        raise ModelError(f"model returned {out.shape[1]} classes, earlier {num_classes}")
    if not torch.isfinite(out).all():
        raise ModelError("model returned NaN or infinite scores")
    return out


@contextlib.contextmanager
def quiet_jit():
    """Silence torch.jit's deprecation notices (FutureWarning): TorchScript is
    the format we ship and read, and the notices are not the user's concern."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


def fast_cpu_copy(module: torch.jit.ScriptModule) -> torch.jit.ScriptModule:
    """A copy of a TorchScript module for CPU scans: 4-D weights in channels_last,
    the layout oneDNN's convolution and pooling kernels are fastest in, then
    frozen (parameters become constants, batch-norm folds into the preceding
    convolution). In ``benchmarks/bench_scanners.py``, 2 threads, a full Neural
    Cleanse scan of a zoo model is 1.6-1.7x faster than on the module as given
    (docs/scanners.md, "The model's own speed"). The module itself is not
    touched; the logits agree to float rounding."""
    buffer = io.BytesIO()
    with quiet_jit():
        torch.jit.save(module, buffer)
        buffer.seek(0)
        copy = torch.jit.load(buffer, map_location="cpu").eval()
        return torch.jit.freeze(copy.to(memory_format=torch.channels_last))


def as_white_box(model, mean=None, std=None) -> WhiteBoxModel:
    if isinstance(model, WhiteBoxModel):
        if mean is not None or std is not None:
            raise ValueError("mean/std: the model is already wrapped with its normalisation")
        return model
    return WhiteBoxModel(model, mean, std)


def load_torchscript(path) -> nn.Module:
    """Load a TorchScript file. TorchScript archives hold code and tensors, not
    pickled Python objects, so loading one does not run arbitrary Python."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file {path}")
    try:
        with quiet_jit():
            return torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:
        raise ValueError(
            f"model: {path} is not a TorchScript archive ({exc}). Pickled models are refused: "
            "export with torch.jit.script/trace and torch.jit.save, or use ONNX."
        ) from exc


# ---------------------------------------------------------------------------
# Query-only (black-box) models
# ---------------------------------------------------------------------------
class BudgetExhausted(RuntimeError):
    """The query budget would be exceeded by the next batch; nothing was sent."""


class QueryModel:
    """A model behind a query interface: images in, class scores out, nothing else.

    fn: callable from a float32 tensor [B, C, H, W] in [0, 1] to scores [B, K]
        (tensor or numpy array).
    outputs: "probabilities", "logits" (softmax is applied) or "auto" (decided
        on the first answer: rows that are non-negative and sum to 1 are
        probabilities).
    batch_size: at most this many images per call.
    budget: at most this many images in all; the batch that would exceed it is
        not sent and BudgetExhausted is raised (scanners then return partial
        results).
    retries / backoff: a call that raises is retried `retries` times, waiting
        backoff * 2^i seconds; then ModelError. Every image sent, including
        re-sent ones, counts as a query.
    """

    access = "black"

    def __init__(self, fn, num_classes: int, input_shape, *, batch_size: int = 256,
                 budget: int | None = None, outputs: str = "probabilities", retries: int = 3,
                 backoff: float = 0.5):
        if not callable(fn):
            raise TypeError(f"fn: expected a callable, got {type(fn).__name__}")
        if int(num_classes) < 2:
            raise ValueError(f"num_classes: a classifier needs >= 2 classes, got {num_classes}")
        if outputs not in ("probabilities", "logits", "auto"):
            raise ValueError(f"outputs: expected 'probabilities', 'logits' or 'auto', got {outputs!r}")
        if int(batch_size) < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if budget is not None and int(budget) < 1:
            raise ValueError(f"budget: must be >= 1 or None, got {budget}")
        self.fn, self.num_classes = fn, int(num_classes)
        self.input_shape = tuple(int(s) for s in input_shape)
        if len(self.input_shape) != 3:
            raise ValueError(f"input_shape: expected (C, H, W), got {input_shape}")
        self.batch_size, self.budget, self.outputs = int(batch_size), budget, outputs
        self.retries, self.backoff = int(retries), float(backoff)
        self.queries = 0

    @property
    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """Class probabilities [B, K] (float32, CPU) for images [B, C, H, W]."""
        scores = self._scores(images)
        # one softmax per call, not per batch: between two ONNX Runtime runs a
        # small multi-threaded torch op costs ~10 ms on a busy 2-core machine
        return torch.softmax(scores, dim=1) if self.outputs == "logits" else scores

    def log_probabilities(self, images: torch.Tensor) -> torch.Tensor:
        """log of the class probabilities [B, K] (float32), the same queries as a call.

        From logits this is their log-softmax, exact where the probabilities
        themselves underflow (a confident model's least likely classes);
        from probabilities, their log, floored at log of float32's smallest
        normal number (-87.3) where the answer is 0.
        """
        scores = self._scores(images)
        if self.outputs == "logits":
            return torch.log_softmax(scores, dim=1)
        return scores.clamp_min(torch.finfo(torch.float32).tiny).log()

    def _scores(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or tuple(images.shape[1:]) != self.input_shape:
            raise ValueError(f"images: the model takes [B, {', '.join(map(str, self.input_shape))}],"
                             f" got {tuple(images.shape)}")
        images = images.detach().to("cpu", torch.float32).contiguous()
        return torch.cat([self._query(images[i:i + self.batch_size])
                          for i in range(0, images.shape[0], self.batch_size)])

    def _query(self, batch: torch.Tensor) -> torch.Tensor:
        if self.budget is not None and self.queries + batch.shape[0] > self.budget:
            raise BudgetExhausted(f"query budget {self.budget} reached ({self.queries} used)")
        for attempt in range(self.retries + 1):
            self.queries += batch.shape[0]
            try:
                out = self.fn(batch)
                break
            except Exception as exc:
                if attempt == self.retries:
                    raise ModelError(f"model call failed after {self.retries} retries: "
                                     f"{type(exc).__name__}: {exc}") from exc
                time.sleep(self.backoff * 2 ** attempt)
        return self._checked_scores(out, batch.shape[0])

    def _checked_scores(self, out, batch: int) -> torch.Tensor:
        """The answer as float32 scores [batch, K], checked (softmax is left to the caller)."""
        try:
            out = torch.as_tensor(out, dtype=torch.float32)
        except Exception as exc:
            raise ModelError(f"model returned {type(out).__name__}, not class scores") from exc
        out = check_logits(out, batch, self.num_classes)
        if self.outputs == "auto":
            self.outputs = "probabilities" if _looks_like_probabilities(out) else "logits"
        if self.outputs == "probabilities" and not _looks_like_probabilities(out):
            raise ModelError("model was declared to return probabilities, but its rows are negative "
                             f"or do not sum to 1 (row sums {out.sum(1)[:4].tolist()}...); "
                             "declare outputs='logits' if it returns logits")
        return out


def _looks_like_probabilities(out: torch.Tensor) -> bool:
    return bool((out >= -1e-6).all() and torch.allclose(out.sum(1), torch.ones(out.shape[0]),
                                                        atol=1e-3))


def as_query_model(model, **kwargs) -> QueryModel:
    """A QueryModel as given, or one wrapping a white-box module (logits out)."""
    if isinstance(model, QueryModel):
        return model
    if isinstance(model, nn.Module):
        module = as_white_box(model)
        input_shape = kwargs.pop("input_shape", None)
        if input_shape is None:
            raise ValueError("input_shape: needed to query an nn.Module as a black box")

        def forward(x):
            with torch.no_grad():
                return module(x.to(module.device))

        probe = forward(torch.zeros(1, *input_shape))
        return QueryModel(forward, probe.shape[1], input_shape, outputs="logits", **kwargs)
    raise TypeError(f"model: expected a QueryModel, an ONNX model or an nn.Module, "
                    f"got {type(model).__name__}")


def load_onnx(path, *, batch_size: int = 256, budget: int | None = None,
              outputs: str = "auto") -> QueryModel:
    """An ONNX file as a query-only model, run by ONNX Runtime on the CPU.

    ONNX files hold a graph and tensors; loading one runs no Python code.
    """
    import onnxruntime as ort

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model: no such file {path}")
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    # no busy-waiting between runs: the scanner's own torch work (sampling,
    # stamping, NES reductions) needs the same cores between two queries
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ValueError(f"model: {path} is not a valid ONNX model ({exc})") from exc
    inputs, outputs_meta = session.get_inputs(), session.get_outputs()
    if len(inputs) != 1:
        raise ValueError(f"model: {path} has {len(inputs)} inputs; an image classifier has one")
    shape = inputs[0].shape
    if len(shape) != 4 or not all(isinstance(s, int) for s in shape[1:]):
        raise ValueError(f"model: {path} input shape {shape} is not [batch, C, H, W] with fixed C, H, W")
    input_name = inputs[0].name

    def run(x: torch.Tensor):
        return session.run([outputs_meta[0].name], {input_name: x.numpy()})[0]

    num_classes = outputs_meta[0].shape[-1]
    if not isinstance(num_classes, int):
        num_classes = run(torch.zeros(1, *shape[1:])).shape[-1]
    model = QueryModel(run, num_classes, shape[1:], batch_size=batch_size, budget=budget,
                       outputs=outputs)
    model.path = str(path)
    return model
