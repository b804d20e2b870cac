"""Picture of the NC masks (top row) and mask*pattern (bottom): python masks_png.py RESULT.masks.npz OUT.png"""
import sys
import numpy as np
from PIL import Image
a = np.load(sys.argv[1])
m, p = a["mask"], a["pattern"]
K, H, W = m.shape
sheet = np.ones((2 * (H + 2), K * (W + 2), 3), np.float32)
for k in range(K):
    sheet[:H, k * (W + 2):k * (W + 2) + W] = m[k][..., None]
    pk = p[k].transpose(1, 2, 0)
    if pk.shape[-1] == 1:
        pk = np.repeat(pk, 3, -1)
    sheet[H + 2:2 * H + 2, k * (W + 2):k * (W + 2) + W] = m[k][..., None] * pk + (1 - m[k][..., None]) * 0.5
Image.fromarray((sheet * 255).astype(np.uint8)).resize((sheet.shape[1] * 4, sheet.shape[0] * 4), Image.NEAREST).save(sys.argv[2])
