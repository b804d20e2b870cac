"""Print the confusion matrix of a trained model on its test set: python confusion.py FOLDER"""
import sys
from pathlib import Path
import numpy as np
import torch
torch.set_num_threads(1)
from trigscan.data import read_npz
from trigscan.zoo.evaluate import load_torchscript
from trigscan.zoo.train import predict
f = Path(sys.argv[1])
a = read_npz(f / "test.npz")
m = load_torchscript(f / "model.pt")
p = predict(m, torch.from_numpy(a["x"])).numpy()
cm = np.zeros((10, 10), int)
np.add.at(cm, (a["y"], p), 1)
print("rows true, cols predicted")
print(cm)
