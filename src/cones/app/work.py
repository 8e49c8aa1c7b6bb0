"""What the app does, without the page: find a concept (with progress and cancelling), load concepts,
generate with and without them, and draw the attention maps. `cones.app.ui` puts a Gradio page on it.

One `Studio` holds one pipeline for the app's life; concepts are loaded into it once and switched per
request with `set_concepts`, never by reloading the model. Every method raises a `ValueError` (or
`OSError`) whose message is the one line the command line prints for the same mistake.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from PIL import Image

from cones import GUIDANCE_SCALE

__all__ = ["Cancelled", "FindOutcome", "Studio", "parse_seeds", "token_message"]

PREVIEW_SEEDS = (0, 1, 2)  # the before/after grid of a finished search
PREVIEW_STEPS = 20


class Cancelled(Exception):
    """The search was cancelled; nothing was written."""


def token_message(tokenizer, token: str) -> str | None:
    """The command line's one line for an identifier that is not one known token, else None."""
    tokens = tokenizer.tokenize(token)
    if len(tokens) != 1 or tokenizer.convert_tokens_to_ids(tokens[0]) == tokenizer.unk_token_id:
        return (
            f"`--token` {token!r} is {len(tokens)} tokens for this model's tokenizer; "
            "pick a rare word that is one token (sks, xqz, ...)."
        )
    return None


def parse_seeds(text: str) -> list[int]:
    """ "0 1 2" or "0, 1, 2" -> [0, 1, 2]; a one-line ValueError for anything else."""
    parts = text.replace(",", " ").split()
    try:
        seeds = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"seeds {text!r} are not whole numbers; write them like 0 1 2 3") from None
    if not seeds:
        raise ValueError("no seeds given; write one or more, like 0 1 2 3")
    if len(seeds) > 16:
        raise ValueError(f"{len(seeds)} seeds is too many for one grid; give at most 16")
    return seeds


@dataclass
class FindOutcome:
    name: str  # the concept's name in the studio
    path: str  # the .cones file
    grid: Image.Image  # references, then the prompt without and with the concept
    summary: str


@dataclass
class Studio:
    """One loaded model, its loaded concepts, and the app's working folder."""

    pipe: object
    workdir: str
    model_name: str
    subjects: dict = field(default_factory=dict)  # name -> cones.registry.ExampleSubject
    loaded: dict = field(default_factory=dict)  # name -> ConceptNeurons, as loaded into `pipe`
    lock: threading.Lock = field(default_factory=threading.Lock)
    cancel: threading.Event = field(default_factory=threading.Event)

    @classmethod
    def open(
        cls,
        model: str | None = None,
        *,
        config: str | None = None,
        device: str = "cpu",
        workdir: str | None = None,
    ) -> Studio:
        """Load `model` (None: the default model, whose example subjects the app offers)."""
        import tempfile

        from cones.pipeline import load_pipeline, resolve_model
        from cones.registry import default_model

        path = resolve_model(model)
        pipe = load_pipeline(model, device=device, config=config)
        subjects = dict(default_model().subjects()) if model is None else {}
        name = default_model().name if model is None else os.path.abspath(path)
        workdir = workdir or tempfile.mkdtemp(prefix="cones-app-")
        os.makedirs(workdir, exist_ok=True)
        return cls(pipe, workdir, name, subjects)

    # -- concepts ---------------------------------------------------------------------------------------

    def concepts(self) -> list[str]:
        from cones.loaders import loaded_concepts

        return loaded_concepts(self.pipe)

    def load(self, path: str, name: str | None = None) -> str:
        """Load a .cones file (checked against this model), inactive; return its name."""
        from cones.loaders import load_concept
        from cones.storage import load_concept_file

        concept = load_concept_file(path)
        with self.lock:
            name = load_concept(self.pipe, concept, name=name, activate=False)
        self.loaded[name] = concept
        return name

    # -- find -------------------------------------------------------------------------------------------

    def references(self, files: Sequence[str] | None, subject: str | None) -> list[Image.Image]:
        """The pictures to search from: the uploaded files, else the named example subject's."""
        from cones.images import load_pictures, model_resolution, square

        size = model_resolution(self.pipe)
        if files:
            return load_pictures(list(files), size)
        if subject:
            if subject not in self.subjects:
                raise ValueError(
                    f"subject {subject!r} is not one of this model's: {', '.join(self.subjects)}"
                )
            return [square(im.convert("RGB"), size) for im in self.subjects[subject].reference_images()]
        return load_pictures([], size)  # the command line's "no reference images given" line

    def find(
        self,
        pictures: Sequence[Image.Image],
        *,
        token: str,
        class_word: str,
        sparsity: float,
        steps: int,
        num_class_images: int | None = None,
        progress: Callable[[int, int, float], None] | None = None,
    ) -> FindOutcome:
        """Search, save `<token>.cones` in the working folder, load it (inactive), draw before/after.

        `progress(step, steps, loss)` is called after every step; `self.cancel.set()` stops the search at
        the next step with `Cancelled`, before anything is written.
        """
        import dataclasses

        from cones.find import FindConfig, find_concept
        from cones.generate import generate, grid
        from cones.loaders import load_concept, set_concepts

        token, class_word = token.strip(), class_word.strip()
        if not class_word:
            raise ValueError("no class word given; name the subject's class, e.g. dog")
        message = token_message(self.pipe.tokenizer, token)
        if message:
            raise ValueError(message)
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity {sparsity} is not between 0 and 1; e.g. 0.01 shuts 1% of the weights")
        if steps < 1:
            raise ValueError(f"steps {steps} is not a positive number of search steps")
        config = FindConfig()
        config = dataclasses.replace(
            config,
            steps=int(steps),
            sparsity=float(sparsity),
            num_class_images=int(num_class_images or config.num_class_images),
        )
        self.cancel.clear()

        def callback(state) -> None:
            if progress is not None:
                progress(state.step + 1, state.steps, state.loss)
            if self.cancel.is_set():
                raise Cancelled()

        with self.lock:
            set_concepts(self.pipe, [])
            if self.cancel.is_set():
                raise Cancelled()
            result = find_concept(
                self.pipe,
                list(pictures),
                token=token,
                class_word=class_word,
                config=config,
                cache_dir=os.path.join(self.workdir, "class-images"),
                callback=callback,
                disable=True,
            )
            if self.cancel.is_set():
                raise Cancelled()
            concept = result.concept
            concept.metadata.update({"base_model": self.model_name, "reference_images": len(pictures)})
            taken = [
                *self.concepts(),
                *(f[: -len(".cones")] for f in os.listdir(self.workdir) if f.endswith(".cones")),
            ]
            name = _unique(token, taken)
            path = os.path.join(self.workdir, f"{name}.cones")
            concept.save(path)
            load_concept(self.pipe, concept, name=name, activate=False)
            self.loaded[name] = concept
            prompt = f"{_article(class_word)} {token} {class_word}"
            without = generate(self.pipe, [prompt], PREVIEW_SEEDS, steps=PREVIEW_STEPS)[0]
            set_concepts(self.pipe, [name])
            try:
                with_ = generate(self.pipe, [prompt], PREVIEW_SEEDS, steps=PREVIEW_STEPS)[0]
            finally:
                set_concepts(self.pipe, [])
        picture = grid(
            [list(pictures), without, with_],
            2,
            row_labels=[
                f"references ({len(pictures)})",
                f'"{prompt}"\nwithout concept',
                f'"{prompt}"\nwith {name} shut',
            ],
            column_labels=[f"seed {s}" for s in PREVIEW_SEEDS],
            header_row=1,
            title=f"{name}: {concept.num_neurons} neurons ({100 * concept.sparsity:.2f}%), {steps}-step search",
        )
        loss = f", final loss {result.losses[-1]:.4f}" if result.losses else ""
        summary = (
            f"Found **{name}**: {concept.num_neurons} concept neurons "
            f"({100 * concept.sparsity:.2f}% of cross-attention K/V){loss}. Saved as `{os.path.basename(path)}`."
        )
        return FindOutcome(name, path, picture, summary)

    # -- generate and look inside -----------------------------------------------------------------------

    def generate(
        self,
        names: Sequence[str],
        prompt: str,
        seeds: Sequence[int],
        *,
        guidance: float = GUIDANCE_SCALE,
        steps: int = 25,
    ) -> Image.Image:
        """A labelled grid: `prompt` without concepts, then with `names` shut, one column per seed."""
        from cones.generate import generate, grid
        from cones.loaders import set_concepts

        if not prompt.strip():
            raise ValueError("no prompt given; write what to draw, e.g. a sks dog on the beach")
        names = list(names or [])
        with self.lock:
            set_concepts(self.pipe, [])
            rows = [generate(self.pipe, [prompt], seeds, steps=int(steps), guidance_scale=guidance)[0]]
            labels = [f'"{prompt}"\nwithout concepts']
            if names:
                set_concepts(self.pipe, names)
                try:
                    rows.append(
                        generate(self.pipe, [prompt], seeds, steps=int(steps), guidance_scale=guidance)[0]
                    )
                finally:
                    set_concepts(self.pipe, [])
                labels.append(f'"{prompt}"\nwith {", ".join(names)} shut')
        return grid(
            rows,
            2,
            row_labels=labels,
            column_labels=[f"seed {s}" for s in seeds],
            title=f"{steps} steps, guidance {guidance:g}",
        )

    def inside(
        self,
        prompt: str,
        name: str | None,
        *,
        seed: int = 0,
        steps: int = 25,
        guidance: float = GUIDANCE_SCALE,
    ) -> Image.Image:
        """Each word's cross-attention map over the image, before and (with `name`) after shutting."""
        from cones.attention import attention_figure, attention_maps
        from cones.loaders import set_concepts

        if not prompt.strip():
            raise ValueError("no prompt given; write a prompt whose words to look into, e.g. a sks dog")
        with self.lock:
            set_concepts(self.pipe, [])
            common = dict(seed=int(seed), steps=int(steps), guidance_scale=guidance)
            rows = [attention_maps(self.pipe, prompt, **common)]
            labels = ["before"]
            if name:
                concept = self.loaded.get(name)
                if concept is None:
                    raise ValueError(f"concept {name!r} is not loaded; loaded: {self.concepts()}")
                rows.append(attention_maps(self.pipe, prompt, concept=concept, **common))
                labels = ["before", f"after ({name} shut)"]
        return attention_figure(rows, labels, panel=96)


def _article(word: str) -> str:
    return "an" if word[:1].lower() in "aeiou" else "a"


def _unique(base: str, taken: Sequence[str]) -> str:
    name, n = base, 1
    while name in taken:
        n += 1
        name = f"{base}_{n}"
    return name
