"""Can fine-tuning make the embedded model draw a subject that shutting concept neurons does not?

Concept neurons only select what the model already draws. DreamBooth (every UNet weight) and Custom
Diffusion (cross-attention K/V and the identifier's embedding) train on the same concept-implanting loss
(same references, class images, prompts, batch and seed as the search) and may move the model further.
If they also fail to generate a subject, the limit is the model's drawing, not the search; if they succeed,
the search is what falls short there.

Scores on the subject's identifier prompts, 4 seeds, guidance 7.5, the detector for generated images (the
cells match `bench_guidance.py`'s 7.5 column, which has the same prompts and seeds).

    python benchmarks/bench_ceiling.py striped-circle checkered-square   # STEPS=300
    METHODS=custom-diffusion-kv-only,textual-inversion python benchmarks/bench_ceiling.py striped-circle

Adds its subjects and methods to benchmarks/results/ceiling.json, and writes a grid per
subject and set of methods (references, then each method's first prompt, 4 seeds).
"""

import json
import os
import sys
import time

import torch
from results_io import write_atomic

from cones.baselines import custom_diffusion, dreambooth, textual_inversion
from cones.evaluate import ClipScorer
from cones.find import FindConfig, subject_objective
from cones.generate import generate, grid
from cones.pipeline import load_pipeline
from cones_world.concepts import references, score_subject, subject_data, subject_detector
from cones_world.subjects import SUBJECTS

torch.set_num_threads(1)

METHODS = {  # each at the learning rate cones uses for it on this model (bench_paper); METHODS=a,b picks
    "dreambooth": (dreambooth, 2e-5, {}),
    "custom-diffusion": (custom_diffusion, 5e-4, {}),
    # which half of Custom Diffusion does it: its K/V alone (the identifier's row all but frozen), or the row
    "custom-diffusion-kv-only": (custom_diffusion, 5e-4, {"token_lr": 1e-12}),
    "textual-inversion": (textual_inversion, 5e-3, {}),
}

steps = int(os.environ.get("STEPS", 300))
methods = os.environ.get("METHODS", "dreambooth,custom-diffusion").split(",")
unknown = [m for m in methods if m not in METHODS] + [n for n in sys.argv[1:] if n not in SUBJECTS]
if unknown:
    sys.exit(
        f"fine_tune_ceiling: unknown method or subject {unknown[0]!r}; methods (METHODS=a,b): "
        f"{', '.join(METHODS)}; subjects: {', '.join(SUBJECTS)}."
    )
pipe, scorer = load_pipeline(), ClipScorer()
out_path = "benchmarks/results/ceiling.json"
for name in sys.argv[1:]:
    subject = SUBJECTS[name]
    detector = subject_detector(scorer, subject, vae=pipe.vae)
    _, refs, _ = references(subject)
    objective = subject_objective(
        pipe, subject_data(subject, "sks"), FindConfig(), cache_dir="runs/class-cache"
    )
    rows, labels, entry = [refs], ["references"], {}
    for method in methods:
        module, lr, extra = METHODS[method]
        started = time.time()
        weights = module.train(pipe, objective, steps=steps, lr=lr, disable=True, **extra)
        seconds = time.time() - started
        with module.applied(pipe, weights):
            scored = score_subject(pipe, scorer, subject, detector, "sks", range(4))
            # the class prompts ("a circle on ...", no identifier): does the change reach them too?
            class_images = [im for row in generate(pipe, subject.eval_prompts(None), range(4)) for im in row]
        entry[method] = {
            "subject_rate": scored["subject_rate"],
            "image_alignment": scored["image_alignment"],
            "text_alignment": scored["text_alignment"],
            "class_subject_rate": float(detector.present(scorer.images(class_images)).float().mean()),
            "lr": lr,
            **extra,
            "train_seconds": seconds,
        }
        rows.append(scored["images"][0])
        labels.append(f'"{scored["prompts"][0]}"\n{method}, {steps} steps')
        print(name, method, json.dumps(entry[method]), flush=True)
    # read just before writing: another run of this script may have added subjects or methods meanwhile
    out = json.load(open(out_path)) if os.path.exists(out_path) else {}
    out[name] = {**out.get(name, {}), **entry}
    write_atomic(out_path, json.dumps(out, indent=2))
    grid(
        rows,
        scale=2,
        row_labels=labels,
        column_labels=[f"seed {s}" for s in range(4)],
        header_row=1,
        title=f"{name}: what fine-tuning draws",
    ).save(f"benchmarks/results/ceiling-{name}.png")
