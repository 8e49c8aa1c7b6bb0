"""The judge's shape choice on 3,000 renders (seed 11) and on the 192 renders of bench_world's prompts,
for CLIP folders given on the command line."""

import json
import os
import random
import sys

sys.path.insert(0, "benchmarks")
import torch

torch.set_num_threads(int(os.environ.get("THREADS", "1")))
from bench_world import canonical_render, judge_on_many_renders, single_object_prompts, zero_shot

from cones.evaluate import ClipScorer

for path in sys.argv[1:]:
    s = ClipScorer(path)
    many = judge_on_many_renders(s, 3000)
    prompts = single_object_prompts(96)
    rng = random.Random(1)
    renders = [canonical_render(p, rng) for p in prompts for _ in range(2)]
    few = zero_shot(s, renders, [p for p in prompts for _ in range(2)])
    print(
        path,
        json.dumps(
            {
                "many": {
                    k: many[k]
                    for k in ("shape", "white_on_white", "other_pairs", "errors", "most_common_errors")
                },
                "192": few,
            }
        ),
        flush=True,
    )
