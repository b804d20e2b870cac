"""Backdoor attacks, training and a model zoo to test scanners against.

* :mod:`.attacks` — triggers (BadNets patch, blended, L-RED's sparse and square
  additive patterns, SIG sinusoid) and :func:`poison`;
* :mod:`.nets` — the two architectures (``cnn``, ``resnet``);
* :mod:`.train` — training, accuracy / attack success, TorchScript and ONNX export;
* :mod:`.build` — the standard and quick zoos, :func:`build_zoo`;
* :mod:`.evaluate` — running registered scanners over a zoo.
"""
from .attacks import (
    Blend, Patch, Poisoned, Rule, Sinusoid, SparseAdditive, SquareAdditive, Trigger, poison, trigger_from_dict,
)
from .build import ModelSpec, build_model, build_zoo, quick_specs, shapes_specs, standard_specs
from .nets import make_model

__all__ = [
    "Blend", "ModelSpec", "Patch", "Poisoned", "Rule", "Sinusoid", "SparseAdditive", "SquareAdditive", "Trigger",
    "build_model", "build_zoo", "make_model", "poison", "quick_specs", "shapes_specs", "standard_specs", "trigger_from_dict",
]
