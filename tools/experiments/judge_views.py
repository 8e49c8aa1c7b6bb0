"""The judge's shape choice on 3,000 renders, seen once or on four quarter-patch shifts as well.

The world CLIP reads 64x64 images in 8x8 patches, so a small shape falls on the patch grid in one of many
ways; `ClipScorer.images(grid_shifts=True)` averages the embedding over the image and four copies moved 2
pixels (edges repeated). Measured on the renders bench_world checks (seed 11) and on another 3,000 (seed 12),
for the CLIP folders given (default: the shipped one).

    THREADS=2 python tools/experiments/judge_views.py [CLIP_FOLDER ...]
"""

import json
import os
import sys

sys.path.insert(0, "benchmarks")
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "2")))
from bench_world import judge_on_many_renders  # noqa: E402

from cones.evaluate import ClipScorer  # noqa: E402


class SingleView:
    """The scorer, asked for one view whatever its caller asks."""

    def __init__(self, scorer: ClipScorer):
        self.scorer = scorer

    def images(self, images, grid_shifts: bool = False):
        return self.scorer.images(images)

    def texts(self, texts):
        return self.scorer.texts(texts)


for path in sys.argv[1:] or [None]:
    scorer = ClipScorer(path)
    for seed in (11, 12):
        for views, judge in (("single view", SingleView(scorer)), ("grid shifts", scorer)):
            r = judge_on_many_renders(judge, 3000, seed=seed)
            print(json.dumps({"clip": path or "shipped", "seed": seed, "views": views, "shape": r["shape"],
                              "white_on_white": r["white_on_white"]["shape"], "other_pairs": r["other_pairs"]["shape"],
                              "errors": r["errors"], "most_common_errors": r["most_common_errors"]}), flush=True)
