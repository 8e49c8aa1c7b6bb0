"""Experiment: does a detector fitted on renders as the VAE returns them (the domain generated images come
from) see the subjects in the shut model's images more often than the one fitted on crisp renders?
Also its rate on unshut identifier images and on base class-prompt images (false alarms)."""

import json
import os
import sys

sys.path.insert(0, "benchmarks")
import numpy as np
import torch

torch.set_num_threads(1)
from bench_attention import world_concept
from PIL import Image

from cones.evaluate import ClipScorer, roc_auc
from cones.generate import generate
from cones.pipeline import load_pipeline
from cones.world.concepts import (
    SubjectDetector,
    best_threshold,
    eval_prompts,
    fit_probe,
    pictures,
    subject_detector,
)
from cones.world.subjects import SUBJECTS
from cones.world.train import vae_roundtrip

pipe = load_pipeline()
scorer = ClipScorer()


def decoded(images):
    arr = torch.from_numpy(np.stack([np.asarray(im.convert("RGB")) for im in images]))
    out = []
    for i in range(0, len(arr), 100):
        out.append(vae_roundtrip(pipe.vae.float(), arr[i : i + 100]))
    return [Image.fromarray(a) for a in torch.cat(out).cpu().numpy()]


def decoded_detector(subject, n=200, n_fit=1000):
    def emb(scenes):
        return scorer.images(decoded(pictures(scenes)))

    pos_fit = emb(subject.held_out(n_fit, seed=1))
    neg_fit = emb([(s,) for s in subject.class_negatives(n_fit, seed=3)])
    mean, scale, w, b = fit_probe(pos_fit, neg_fit)
    d = SubjectDetector(torch.zeros(1, 1), mean, scale, w, b, 0.0, 0.0, 0.0)
    pos = d.scores(emb(subject.held_out(n, seed=0))).numpy()
    neg = d.scores(emb([(s,) for s in subject.class_negatives(n, seed=2)])).numpy()
    d.threshold, d.auc = best_threshold(pos, neg), roc_auc(pos, neg)
    return d


out = {}
steps, sparsity = int(os.environ.get("STEPS", 300)), float(os.environ.get("SPARSITY", 0.1))
for name in sys.argv[1:]:
    subject = SUBJECTS[name]
    crisp, dec = subject_detector(scorer, subject), decoded_detector(subject)
    # the crisp detector's AUC on decoded renders too
    pos = crisp.scores(scorer.images(decoded(pictures(subject.held_out(200, seed=0))))).numpy()
    neg = crisp.scores(
        scorer.images(decoded(pictures([(s,) for s in subject.class_negatives(200, seed=2)])))
    ).numpy()
    concept = world_concept(pipe, name, steps=steps, sparsity=sparsity)
    prompts = eval_prompts(subject, "sks")
    class_prompts = eval_prompts(subject, None)
    rows = {}
    for label, ps, shut in (
        ("identifier, unshut", prompts, False),
        ("identifier, shut", prompts, True),
        ("class, unshut", class_prompts, False),
    ):
        if shut:
            concept.apply(pipe.unet)
        imgs = [im for row in generate(pipe, ps, [0, 1]) for im in row]
        if shut:
            concept.remove(pipe.unet)
        e = scorer.images(imgs)
        rows[label] = {
            "crisp": float(crisp.present(e).float().mean()),
            "decoded": float(dec.present(e).float().mean()),
        }
    out[name] = {
        "auc_crisp_on_renders": crisp.auc,
        "auc_crisp_on_decoded": roc_auc(pos, neg),
        "auc_decoded_on_decoded": dec.auc,
        "rates": rows,
    }
    print(name, json.dumps(out[name]), flush=True)
json.dump(out, open(f"runs/s8/decoded-detector-{steps}-{sparsity}.json", "w"), indent=1)
