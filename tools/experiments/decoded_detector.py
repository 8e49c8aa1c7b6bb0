"""Experiment: does a detector fitted on renders as the VAE returns them (the domain generated images come
from) see the subjects in the shut model's images more often than the one fitted on crisp renders?
Also its rate on unshut identifier images and on base class-prompt images (false alarms).

    python tools/experiments/decoded_detector.py striped-diamond dotted-triangle   # STEPS=300 SPARSITY=0.1
"""

import json
import os
import sys
from contextlib import nullcontext

sys.path.insert(0, "benchmarks")
import torch

torch.set_num_threads(1)
from bench_attention import world_concept

from cones.evaluate import ClipScorer, roc_auc
from cones.generate import generate
from cones.pipeline import load_pipeline
from cones.world.concepts import embed, eval_prompts, pictures, subject_detector
from cones.world.subjects import SUBJECTS

pipe = load_pipeline()
scorer = ClipScorer()
out = {}
steps, sparsity = int(os.environ.get("STEPS", 300)), float(os.environ.get("SPARSITY", 0.1))
for name in sys.argv[1:]:
    subject = SUBJECTS[name]
    crisp, decoded = subject_detector(scorer, subject), subject_detector(scorer, subject, vae=pipe.vae)
    # the crisp detector's AUC on the decoded detector's held-out renders
    pos = crisp.scores(embed(scorer, pictures(subject.held_out(200, seed=0)), pipe.vae)).numpy()
    neg = crisp.scores(
        embed(scorer, pictures([(s,) for s in subject.class_negatives(200, seed=2)]), pipe.vae)
    ).numpy()
    concept = world_concept(pipe, name, steps=steps, sparsity=sparsity)
    rows = {}
    for label, token, shut in (
        ("identifier, unshut", "sks", False),
        ("identifier, shut", "sks", True),
        ("class, unshut", None, False),
    ):
        with concept.shut(pipe.unet) if shut else nullcontext():
            images = [im for row in generate(pipe, eval_prompts(subject, token), [0, 1]) for im in row]
        e = scorer.images(images)
        rows[label] = {
            "crisp": float(crisp.present(e).float().mean()),
            "decoded": float(decoded.present(e).float().mean()),
        }
    out[name] = {
        "auc_crisp_on_renders": crisp.auc,
        "auc_crisp_on_decoded": roc_auc(pos, neg),
        "auc_decoded_on_decoded": decoded.auc,
        "rates": rows,
    }
    print(name, json.dumps(out[name]), flush=True)
os.makedirs("runs", exist_ok=True)
with open(f"runs/decoded-detector-{steps}-{sparsity}.json", "w") as f:
    json.dump(out, f, indent=1)
