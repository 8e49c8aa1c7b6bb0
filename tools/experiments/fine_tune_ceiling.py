"""Experiment: can fine-tuning make the embedded model draw a subject that shutting concept neurons does not?

Concept neurons only select what the model already draws. DreamBooth (every UNet weight) and Custom
Diffusion (cross-attention K/V and the identifier's embedding) train on the same concept-implanting loss
(same references, class images, prompts, batch and seed as the search) and may move the model further.
If they also fail to generate a subject, the limit is the model's drawing, not the search; if they succeed,
the search is what falls short there.

Scores on the subject's identifier prompts, 4 seeds, guidance 7.5, the detector for generated images (the
cells match `bench_guidance.py`'s 7.5 column, which has the same prompts and seeds).

    python tools/experiments/fine_tune_ceiling.py striped-circle checkered-square   # STEPS=300

Writes benchmarks/results/fine-tune-ceiling-STEPS.json and a grid per subject (references, DreamBooth,
Custom Diffusion; first prompt, 4 seeds).
"""

import json
import os
import sys
import time

import torch

torch.set_num_threads(1)
from cones.baselines import custom_diffusion, dreambooth, textual_inversion
from cones.evaluate import ClipScorer
from cones.find import FindConfig, concept_objective
from cones.generate import generate, grid
from cones.pipeline import load_pipeline
from cones.world.concepts import eval_prompts, references, score_subject, search_prompts, subject_detector
from cones.world.subjects import SUBJECTS

METHODS = {  # each at the learning rate cones uses for it on this model (bench_paper); METHODS=a,b picks
    "dreambooth": (dreambooth, 2e-5, {}),
    "custom-diffusion": (custom_diffusion, 5e-4, {}),
    # which half of Custom Diffusion does it: its K/V alone (the identifier's row all but frozen), or the row
    "custom-diffusion-kv-only": (custom_diffusion, 5e-4, {"token_lr": 1e-12}),
    "textual-inversion": (textual_inversion, 5e-3, {}),
}

steps = int(os.environ.get("STEPS", 300))
methods = os.environ.get("METHODS", "dreambooth,custom-diffusion").split(",")
pipe, scorer = load_pipeline(), ClipScorer()
out_path = f"benchmarks/results/fine-tune-ceiling-{steps}.json"
out = json.load(open(out_path)) if os.path.exists(out_path) else {}
for name in sys.argv[1:]:
    subject = SUBJECTS[name]
    detector = subject_detector(scorer, subject, vae=pipe.vae)
    images, refs, _ = references(subject)
    subject_prompts, class_prompts = search_prompts(subject, "sks")
    objective = concept_objective(pipe, images, token="sks", class_word=subject.class_word, config=FindConfig(),
                                  subject_prompts=subject_prompts, class_prompts=class_prompts,
                                  cache_dir="runs/class-cache")
    rows, entry = [refs], out.get(name, {})
    for method in methods:
        module, lr, extra = METHODS[method]
        started = time.time()
        weights = module.train(pipe, objective, steps=steps, lr=lr, disable=True, **extra)
        seconds = time.time() - started
        with module.applied(pipe, weights):
            scored = score_subject(pipe, scorer, subject, detector, "sks", range(4))
            # the class prompts ("a circle on ...", no identifier): does the change reach them too?
            class_images = [im for row in generate(pipe, eval_prompts(subject, None), range(4)) for im in row]
        entry[method] = {"subject_rate": scored["subject_rate"], "image_alignment": scored["image_alignment"],
                         "text_alignment": scored["text_alignment"],
                         "class_subject_rate": float(detector.present(scorer.images(class_images)).float().mean()),
                         "lr": lr, **extra, "train_seconds": seconds}
        rows.append(scored["images"][0])
        print(name, method, json.dumps(entry[method]), flush=True)
    # read again before writing: another run of this script may have added subjects meanwhile
    out = json.load(open(out_path)) if os.path.exists(out_path) else {}
    out[name] = {**out.get(name, {}), **entry}
    tmp = f"{out_path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(out, f, indent=2)
    os.replace(tmp, out_path)
    grid(rows, scale=2).save(f"benchmarks/results/fine-tune-ceiling-{steps}-{name}-{'-'.join(methods)}.png")
