"""The page of app.py (Gradio): one photo, a folder or zip of photos, and the model.

Each handler asks the DemoModel (service.py) and turns its answer into components; a user mistake
(a file that is no photo, an oversized upload, a bad zip) becomes a message on the page through
gr.Error, and the server goes on serving. Every event has an api_name, so the page's HTTP API
(gradio_client) gives the same answers: /photo, /gradcam, /folder, /model.
"""

from __future__ import annotations

import html
import logging
import os
import time
from pathlib import Path

from animal_lightning.app.service import DemoModel, FolderAnswer, PhotoAnswer
from animal_lightning.errors import AnimalLightningError, DataError
from animal_lightning.prediction import format_scores

log = logging.getLogger(__name__)

ONE_AT_A_TIME = {"concurrency_id": "model", "concurrency_limit": 1}  # all events share one slot: the model
TABLE_COLUMNS = ("image_id", "class", "confidence", "known_score", "open_set", "source", "label", "error")


def import_gradio():
    """gradio, or the one-line way to get it (the `app` extra)."""
    try:
        import gradio
    except ImportError:
        raise DataError("app.py needs Gradio: pip install -e '.[app]' (or make app)") from None
    return gradio


def use_temporary_folder(folder: Path) -> None:
    """Point Gradio's upload cache at `folder` (it reads GRADIO_TEMP_DIR when imported) and keep it offline."""
    os.environ["GRADIO_TEMP_DIR"] = str(folder)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


def verdict(answer: PhotoAnswer, cam_seconds: float | None = None) -> str:
    """The answer in words (Markdown): the class, how sure, known or unknown, the unseen guess, the time."""
    lines = [f"## {html.escape(answer.answer)} · {answer.confidence:.1%}"]
    if answer.source and answer.source != "classifier":
        lines.append(f"Named by zero-shot ({answer.source}): a class without training photos.")
    if answer.unknown is None:
        lines.append(f"Known-class score ({answer.score}): {answer.known_score:.4g}; this checkpoint has no "
                     "calibrated threshold, so no unknown flag.")
    else:
        comparison = "below" if answer.unknown else "at or above"
        status = "**unknown**: probably none of the training classes" if answer.unknown else "known"
        lines.append(f"Known-class score ({answer.score}): {answer.known_score:.4g}, {comparison} the threshold "
                     f"{answer.threshold:.4g} (which keeps {answer.keep:.0%} of validation photos known): {status}.")
    if answer.unseen_guess:
        matched = ", ".join(f"{name} ({p:.0%})" for name, p in answer.matched)
        lines.append(f"Best unseen-class guess: **{html.escape(answer.unseen_guess)}**"
                     + (f", matching the attributes {html.escape(matched)}." if matched else "."))
    lines.append(f"Answered in {answer.seconds:.2f} s" + ("." if cam_seconds is None else
                                                          f", Grad-CAM in {cam_seconds:.2f} s."))
    return "\n\n".join(lines)


def folder_summary(answer: FolderAnswer) -> str:
    unreadable = sum(1 for row in answer.rows if row["error"])
    lines = [f"**{len(answer.rows)} photos** from {html.escape(answer.description)} in {answer.seconds:.1f} s; "
             f"{unreadable} unreadable."]
    flagged = sum(1 for row in answer.rows if row.get("open_set") == "unknown")
    if any(row.get("open_set") for row in answer.rows):
        lines.append(f"{flagged} flagged unknown.")
    if answer.skipped:
        lines.append("Left out of the zip: " + "; ".join(f"`{html.escape(name)}` ({reason})"
                                                         for name, reason in answer.skipped[:20])
                     + (f" and {len(answer.skipped) - 20} more" if len(answer.skipped) > 20 else ""))
    if answer.scores:
        lines.append("```\n" + format_scores(answer.scores) + "\n```")
    return "\n\n".join(lines)


def card_markdown(card: dict) -> str:
    metrics = card["metrics"]
    rows = "\n".join(f"| {html.escape(key)} | {value:.4g} |" if isinstance(value, float) else
                     f"| {html.escape(key)} | {value} |" for key, value in sorted(metrics.items()))
    unseen = ", ".join(card["unseen_classes"]) or "none"
    return "\n".join([
        f"**Backbone** `{card['backbone']}` · **input** {card['input_size']} px ({card['resize_mode']}), "
        f"mean {card['mean']}, std {card['std']} · **precision** {card['precision']} · **TTA** {card['tta']}",
        "",
        f"**Classes ({len(card['classes'])})**: {html.escape(', '.join(card['classes']))}",
        "",
        f"**Unseen classes (zero-shot)**: {html.escape(unseen)} · **open set**: {card['open_set_score']}, keeps "
        f"{card['open_set_keep']:.0%} of validation photos known" + ("" if card["calibrated"] else " (not calibrated)"),
        "",
        f"**Checkpoint** `{card['checkpoint']}`",
        "",
        "| training metric | value |\n|---|---|\n" + rows if rows else "No metrics.json beside the checkpoint's run.",
    ])


def untouched(image):
    """A gr.Image that hands over the uploaded file as it came: gr.Image would open it with PIL first, which fails
    on a file that is no image before the service can name the problem, and only warns at 100 megapixels. The
    service checks and decodes it once, refusing oversized images from the header. (An override on the instance:
    a subclass of a Gradio component makes Gradio write a .pyi file beside this module.)"""
    preprocess = image.preprocess

    def as_uploaded(payload):
        if payload is None or payload.path is None:  # a pasted image may come as a data: URL
            return preprocess(payload)
        return str(payload.path)

    image.preprocess = as_uploaded
    return image


def build_page(service: DemoModel, examples: list[Path]):
    """The gr.Blocks of the page (not launched)."""
    gr = import_gradio()

    def answer_photo(path):
        if not path:
            return None, "", None, gr.update(choices=[], value=None), None
        try:
            answer = service.photo(path)
            top_class = answer.top[0][0]
            start = time.perf_counter()
            overlay = service.explain(path, top_class)
            cam_seconds = time.perf_counter() - start
        except AnimalLightningError as error:
            raise gr.Error(str(error), print_exception=False) from None
        label = {name: probability for name, probability in answer.top}
        choices = [name for name, _ in answer.top]
        return (label, verdict(answer, cam_seconds), str(overlay), gr.update(choices=choices, value=top_class),
                answer.as_dict())

    def explain_class(path, class_name):
        if not path or not class_name:
            return None
        try:
            return str(service.explain(path, class_name))
        except AnimalLightningError as error:
            raise gr.Error(str(error), print_exception=False) from None

    def answer_folder(files, progress=gr.Progress()):  # noqa: B008 (Gradio's way of asking for a progress bar)
        if not files:
            raise gr.Error("choose photos or a zip of them first", print_exception=False)
        paths = [getattr(f, "name", f) for f in files]
        progress(0, desc="Predicting")
        try:
            answer = service.folder(paths, on_chunk=lambda done, total: progress((done, total), unit="photos"))
        except AnimalLightningError as error:
            raise gr.Error(str(error), print_exception=False) from None
        columns = [c for c in TABLE_COLUMNS if any(c in row for row in answer.rows)]
        table = [[row.get(c, "") for c in columns] for row in answer.rows]
        return (folder_summary(answer), gr.update(value=table, headers=columns), answer.thumbnails,
                [str(p) for p in answer.files], str(answer.confusion) if answer.confusion else None)

    card = service.card()
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],  # no web fonts: works offline
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title="animal-lightning", analytics_enabled=False) as page:
        page.theme = theme
        gr.Markdown(f"# animal-lightning · {html.escape(card['backbone'])} · {len(card['classes'])} classes")
        with gr.Tab("One photo"):
            with gr.Row():
                with gr.Column():
                    photo = untouched(gr.Image(type="filepath", label="Photo (upload, drop or paste)", height=320,
                                               sources=["upload", "clipboard"], elem_id="photo"))
                    if examples:
                        gr.Examples([[str(p)] for p in examples], inputs=[photo], label="Example photos")
                with gr.Column():
                    top = gr.Label(num_top_classes=5, label="Top 5", elem_id="top5")
                    said = gr.Markdown(elem_id="verdict")
            with gr.Row():
                overlay = gr.Image(type="filepath", label="Grad-CAM: where the evidence came from", height=320,
                                   interactive=False, elem_id="gradcam")
                with gr.Column():
                    cam_class = gr.Dropdown(label="Grad-CAM for class", choices=[], elem_id="cam-class")
                    with gr.Accordion("Answer as JSON", open=False):
                        details = gr.JSON(label="answer")
        with gr.Tab("A folder or zip"):
            files = gr.File(file_count="multiple", label="Photos, or one zip (class folders inside: also scored)",
                            elem_id="folder")
            go = gr.Button("Predict all", variant="primary")
            summary = gr.Markdown()
            with gr.Row():
                table = gr.Dataframe(label="Predictions (click a column to sort)", interactive=False, wrap=True)
                downloads = gr.File(label="predictions.csv, submission.csv", file_count="multiple",
                                    interactive=False)
            gallery = gr.Gallery(label="Thumbnails", columns=6, height="auto")
            confusion = gr.Image(type="filepath", label="Confusion matrix (labelled zips)", interactive=False)
        with gr.Tab("The model"):
            gr.Markdown(card_markdown(card))
            model_json = gr.JSON(value=card, label="model", visible=False)

        photo.change(answer_photo, inputs=photo, outputs=[top, said, overlay, cam_class, details], api_name="photo",
                     **ONE_AT_A_TIME)
        cam_class.input(explain_class, inputs=[photo, cam_class], outputs=overlay, api_name="gradcam",
                        **ONE_AT_A_TIME)
        go.click(answer_folder, inputs=files, outputs=[summary, table, gallery, downloads, confusion],
                 api_name="folder", **ONE_AT_A_TIME)
        page.load(lambda: card, outputs=model_json, api_name="model")
    return page
