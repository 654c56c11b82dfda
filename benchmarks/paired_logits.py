"""Paired differences between saved evaluation rows (the ``OUT.stepN.pt`` logits of bench_distil_aug.py):
for each ``BEFORE.pt,AFTER.pt`` the KL and top-1 agreement against float32's logits (``--ref``) of AFTER minus
BEFORE on the same inputs, mean and standard error of the per-input differences.

    python3 benchmarks/paired_logits.py --ref /tmp/effnet-aug-cache/ref-312.pt C.json.step500.pt,H.json.step500.pt
"""

from __future__ import annotations

import argparse
import json

import torch

from abfp.zoo.base import AGREEMENT, KL
from plan_rows import paired  # benchmarks/plan_rows.py


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref", default="/tmp/effnet-aug-cache/ref-312.pt", help="float32's logits on the same inputs")
    ap.add_argument("--json", default=None, help="also write the rows here")
    ap.add_argument("pairs", nargs="+", metavar="BEFORE.pt,AFTER.pt")
    a = ap.parse_args()
    ref = torch.load(a.ref)
    rows = []
    for pair in a.pairs:
        before, sep, after = pair.partition(",")
        if not sep:
            ap.error(f"{pair!r}: give BEFORE.pt,AFTER.pt")
        x, y = torch.load(before), torch.load(after)
        if x.shape != ref.shape or y.shape != ref.shape:
            ap.error(f"{pair}: shapes {tuple(x.shape)}, {tuple(y.shape)} against the reference's {tuple(ref.shape)}")
        (dk, dk_se), (da, da_se) = paired(KL, x, y, ref), paired(AGREEMENT, x, y, ref)
        rows.append({"before": before, "after": after, "d_kl": dk, "d_kl_se": dk_se, "d_agreement": da,
                     "d_agreement_se": da_se})
        print(f"{pair}: KL {dk:+.4f} +- {dk_se:.4f} ({dk / dk_se if dk_se else float('nan'):+.1f} se), "
              f"agreement {da:+.1f} +- {da_se:.1f} points")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
