"""The Gradio page of `cones app`: Find, Generate and Inside tabs on one `Studio`.

Every handler shows what went wrong as one line in the page (the command line's message for the same
mistake), never a traceback; the element ids (`find-status`, `generate-status`, ...) are what the browser
test reads.
"""

from __future__ import annotations

import logging
import os
import queue
import threading

import gradio as gr

from cones import GUIDANCE_SCALE
from cones.app.work import Cancelled, Studio, parse_seeds

__all__ = ["build_app", "THEME"]

log = logging.getLogger("cones.app")

# System fonts only: the page must not fetch anything from the network.
THEME = gr.themes.Default(
    font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
)
UPLOAD = "(my uploaded pictures)"


def _error(e: BaseException) -> str:
    """One line for the page; the traceback goes to the server's log only."""
    if not isinstance(e, (ValueError, OSError)):
        log.exception("unexpected error")
    text = " ".join(str(e).split()) or type(e).__name__
    return f"**error:** {text}"


def _friendly(message: str, files: list[str] | None) -> str:
    """The page's own temporary upload paths replaced by the names the user gave the files."""
    for path in files or []:
        message = message.replace(path, os.path.basename(path))
    return message


def build_app(studio: Studio) -> gr.Blocks:
    from cones.find import FindConfig

    defaults = FindConfig()
    subjects = sorted(studio.subjects)
    with gr.Blocks(title="cones", analytics_enabled=False) as app:
        gr.Markdown(
            f"# cones: concept neurons\nModel: `{studio.model_name}`. Find the few key/value weights that hold "
            "a subject, then shut them to make the model draw it."
        )
        with gr.Tabs():
            # -- Find ----------------------------------------------------------------------------------
            with gr.Tab("Find", id="find"):
                with gr.Row():
                    with gr.Column():
                        files = gr.File(
                            label="Reference pictures (3-5)",
                            file_count="multiple",
                            type="filepath",
                            elem_id="find-files",
                        )
                        subject = gr.Dropdown(
                            choices=[UPLOAD, *subjects],
                            value=UPLOAD,
                            visible=bool(subjects),
                            label="...or one of the model's example subjects",
                            elem_id="find-subject",
                        )
                        with gr.Row():
                            token = gr.Textbox(
                                value="sks", label="Identifier (one rare token)", elem_id="find-token"
                            )
                            class_word = gr.Textbox(
                                value="", label="Class word (e.g. dog)", elem_id="find-class"
                            )
                        with gr.Row():
                            sparsity = gr.Number(
                                value=defaults.sparsity,
                                label="Sparsity (share of K/V to shut)",
                                elem_id="find-sparsity",
                            )
                            steps = gr.Number(
                                value=defaults.steps, precision=0, label="Search steps", elem_id="find-steps"
                            )
                            num_class = gr.Number(
                                value=defaults.num_class_images,
                                precision=0,
                                label="Class images (prior)",
                                elem_id="find-class-images",
                            )
                        with gr.Row():
                            run = gr.Button("Find concept neurons", variant="primary", elem_id="find-run")
                            stop = gr.Button("Cancel", elem_id="find-cancel")
                    with gr.Column():
                        status = gr.Markdown("", elem_id="find-status")
                        concept_file = gr.File(
                            label="The concept (.cones)", interactive=False, elem_id="find-concept"
                        )
                        preview = gr.Image(
                            label="Before / after",
                            type="pil",
                            interactive=False,
                            show_label=False,
                            elem_id="find-grid",
                        )

            # -- Generate ------------------------------------------------------------------------------
            with gr.Tab("Generate", id="generate"):
                with gr.Row():
                    with gr.Column():
                        chosen = gr.CheckboxGroup(
                            choices=studio.concepts(), label="Concepts to shut", elem_id="generate-concepts"
                        )
                        upload = gr.File(
                            label="Load a .cones file",
                            file_count="single",
                            type="filepath",
                            elem_id="generate-upload",
                        )
                        prompt = gr.Textbox(value="a sks dog", label="Prompt", elem_id="generate-prompt")
                        with gr.Row():
                            seeds = gr.Textbox(value="0 1 2 3", label="Seeds", elem_id="generate-seeds")
                            guidance = gr.Number(
                                value=GUIDANCE_SCALE, label="Guidance", elem_id="generate-guidance"
                            )
                            gen_steps = gr.Number(
                                value=25, precision=0, label="Sampling steps", elem_id="generate-steps"
                            )
                        gen = gr.Button("Generate", variant="primary", elem_id="generate-run")
                    with gr.Column():
                        gen_status = gr.Markdown("", elem_id="generate-status")
                        gen_grid = gr.Image(
                            label="Without and with the concepts",
                            type="pil",
                            show_label=False,
                            interactive=False,
                            elem_id="generate-grid",
                        )

            # -- Inside --------------------------------------------------------------------------------
            with gr.Tab("Inside", id="inside"):
                with gr.Row():
                    with gr.Column():
                        in_concept = gr.Dropdown(
                            choices=studio.concepts(), label="Concept", elem_id="inside-concept"
                        )
                        in_prompt = gr.Textbox(value="a sks dog", label="Prompt", elem_id="inside-prompt")
                        in_seed = gr.Number(value=0, precision=0, label="Seed", elem_id="inside-seed")
                        look = gr.Button("Show attention maps", variant="primary", elem_id="inside-run")
                    with gr.Column():
                        in_status = gr.Markdown(
                            "Each word's cross-attention map over the image, before and after shutting the "
                            "concept (bright: most attention).",
                            elem_id="inside-status",
                        )
                        in_figure = gr.Image(
                            label="Attention",
                            type="pil",
                            interactive=False,
                            show_label=False,
                            elem_id="inside-grid",
                        )

        def concept_choices(value=None):
            names = studio.concepts()
            latest = names[-1] if names else None
            return gr.CheckboxGroup(choices=names, value=value), gr.Dropdown(choices=names, value=latest)

        # -- handlers --------------------------------------------------------------------------------------

        def on_subject(name, current):
            if name and name != UPLOAD and name in studio.subjects:
                return studio.subjects[name].class_word
            return current

        subject.change(on_subject, [subject, class_word], class_word)

        def on_find(
            paths,
            subject_name,
            token_text,
            class_text,
            sparsity_value,
            steps_value,
            class_images,
            progress=gr.Progress(),  # noqa: B008 - how Gradio asks for a progress bar
        ):
            paths = list(paths or [])
            nothing = (gr.File(value=None), None, *concept_choices())
            try:
                pictures = studio.references(paths, None if subject_name == UPLOAD else subject_name)
            except Exception as e:  # every error becomes one line in the page
                yield (_friendly(_error(e), paths), *nothing)
                return
            updates: queue.Queue = queue.Queue()
            outcome: dict = {}

            def work():
                try:
                    outcome["done"] = studio.find(
                        pictures,
                        token=token_text,
                        class_word=class_text,
                        sparsity=float(sparsity_value or 0),
                        steps=int(steps_value or 0),
                        num_class_images=int(class_images or 0) or None,
                        progress=lambda k, n, loss: updates.put((k, n, loss)),
                    )
                except BaseException as e:  # reported below
                    outcome["error"] = e
                finally:
                    updates.put(None)

            worker = threading.Thread(target=work, daemon=True)
            worker.start()
            yield ("Preparing: class images for the prior, then the search...", *nothing)
            try:
                while True:
                    item = updates.get()
                    if item is None:
                        break
                    k, n, loss = item
                    progress((k, n), desc=f"loss {loss:.4f}", unit="steps")
                    yield (f"Searching: step {k}/{n}, loss {loss:.4f}", *nothing)
            finally:
                if worker.is_alive():  # the page went away: stop the search
                    studio.cancel.set()
            worker.join()
            if "error" in outcome:
                e = outcome["error"]
                text = "Cancelled: nothing was written." if isinstance(e, Cancelled) else _error(e)
                yield (text, *nothing)
                return
            done = outcome["done"]
            yield (done.summary, gr.File(value=done.path), done.grid, *concept_choices())

        run.click(
            on_find,
            [files, subject, token, class_word, sparsity, steps, num_class],
            [status, concept_file, preview, chosen, in_concept],
            concurrency_limit=1,
        )
        stop.click(lambda: studio.cancel.set(), None, None, queue=False)

        def on_upload(path, current):
            if not path:
                return "", *concept_choices(current)
            try:
                name = studio.load(path)
            except Exception as e:
                return _friendly(_error(e), [path]), *concept_choices(current)
            return f"Loaded **{name}**.", *concept_choices([*(current or []), name])

        upload.upload(on_upload, [upload, chosen], [gen_status, chosen, in_concept])

        def on_generate(names, prompt_text, seeds_text, guidance_value, steps_value):
            try:
                picture = studio.generate(
                    names,
                    prompt_text,
                    parse_seeds(seeds_text),
                    guidance=float(guidance_value),
                    steps=int(steps_value or 25),
                )
            except Exception as e:
                return _error(e), None
            shut = ", ".join(names) if names else "no concept"
            return f"Generated without and with: {shut}.", picture

        gen.click(
            on_generate,
            [chosen, prompt, seeds, guidance, gen_steps],
            [gen_status, gen_grid],
            concurrency_limit=1,
        )

        def on_inside(name, prompt_text, seed):
            try:
                figure = studio.inside(prompt_text, name, seed=int(seed or 0))
            except Exception as e:
                return _error(e), None
            if not name:
                return "Each word's map (choose a concept to see it after shutting too).", figure
            return f"Before and after shutting {name}: each word's map over the image.", figure

        look.click(on_inside, [in_concept, in_prompt, in_seed], [in_status, in_figure], concurrency_limit=1)
    return app
