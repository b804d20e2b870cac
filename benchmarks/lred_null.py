"""How often L-RED's test flags a model with no backdoor: K statistics drawn
from one null distribution, the share with p < phi for the paper's plain
order-statistic p-value and for the calibrated one (trigscan.detect).

    python benchmarks/lred_null.py [--trials 1000] [--k 10] [--draws 2000] [--phi 0.05]

Nulls: Gamma with shapes 5 to 400 (the family the test assumes; fitted to
the digits zoo's clean models, r = 1/||v|| gives shapes 15-140) and normals of
the same coefficient of variation. A test at level phi should flag about phi of them.
"""
from __future__ import annotations

import argparse

import numpy as np

from trigscan.detect import gamma_order_pvalue


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=1000, help="null models per row")
    parser.add_argument("--k", type=int, default=10, help="classes (statistics per model)")
    parser.add_argument("--draws", type=int, default=2000, help="calibration draws per model")
    parser.add_argument("--phi", type=float, default=0.05)
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    print(f"K = {args.k}, {args.trials} null models per row, phi = {args.phi}, {args.draws} calibration draws")
    print(f"{'null':>22s}  {'plain p < phi':>13s}  {'calibrated p < phi':>18s}  {'median raw level':>16s}")
    for shape in (5, 30, 100, 400):
        for family in ("gamma", "normal"):
            plain = calibrated = 0
            levels = []
            for trial in range(args.trials):
                if family == "gamma":
                    r = rng.gamma(shape, 1.0, args.k)
                else:  # same mean and coefficient of variation as Gamma(shape)
                    r = np.abs(1 + rng.normal(0, 1 / np.sqrt(shape), args.k))
                out = gamma_order_pvalue(r, calibration_draws=args.draws, seed=trial, phi=args.phi)
                plain += out["p_value"] < args.phi
                calibrated += out["calibrated_p_value"] < args.phi
                levels.append(out["raw_level"])
            name = f"{family}, shape {shape}" if family == "gamma" else f"normal, cv 1/sqrt({shape})"
            print(f"{name:>22s}  {plain / args.trials:13.3f}  {calibrated / args.trials:18.3f}  "
                  f"{np.median(levels):16.2g}")


if __name__ == "__main__":
    main()
