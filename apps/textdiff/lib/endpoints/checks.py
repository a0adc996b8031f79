"""The checks MONAI Label's own routes get through the app's hooks (`MyApp.infer`, `batch_infer`, `next_sample`,
`scoring`, `bundle_path`): unknown names, missing models or data, and images outside the datastore become 4xx answers
instead of MONAI Label's 500s or jobs that fail later. The routes the app replaces check their input themselves, in
this package too."""

from __future__ import annotations

import torch
from textdiff.data.studies import read_studies
from textdiff.weak.cdm import image_level_label

from ..errors import bad_request, check_id, not_found
from ..trainers.textdiff import pseudo_labeled_cases
from .infer import UPLOAD


def infer_request(app, request: dict) -> dict:
    """A known model with weights and an image of the datastore (or the request's own upload); adds its report and
    image-level label from the datastore."""
    model = request.get("model")
    if model not in app._infers:
        raise not_found(f"no model '{model}': available are {sorted(app._infers)}")
    if not app._infers[model].is_valid():
        raise not_found(f"model '{model}' has no weights yet: train it first (POST /train/{model})")
    image = request.get("image")
    if not isinstance(image, str) or not image:
        raise bad_request("say which image to segment: ?image=<id>")
    if image == request.get(UPLOAD):
        return request
    check_id(image)
    if image not in app.datastore().list_images():
        raise not_found(f"no image '{image}' in the datastore")
    info = app.datastore().get_image_info(image)
    return {**request, "report": info.get("report", ""), "stored_label": info.get("image_label")}


def batch_infer_request(app, request: dict) -> dict:
    """A known model; server-set keys dropped; on a CPU-only server one CPU job (MONAI Label 0.8.5 spreads batch jobs
    over GPUs by default and divides by zero without one)."""
    if request.get("model") not in app._infers:
        raise not_found(f"no model '{request.get('model')}': available are {sorted(app._infers)}")
    request = {key: value for key, value in request.items() if not key.startswith("_")}
    if not torch.cuda.is_available():
        request = {**request, "multi_gpu": False, "device": "cpu"}
    return request


def known(kind: str, name: object, available: dict) -> None:
    """An active-learning strategy or scoring method the app has."""
    if name not in available:
        raise not_found(f"no {kind} '{name}': available are {sorted(available)}")


def job(app, model: str | None, textdiff: str, cdm: str) -> None:
    """A train or scoring job that can run: a known trainer; final labels (or CDM proposals) for `textdiff`; healthy
    and abnormal images for the `cdm`."""
    if model is not None and model not in app._trainers:
        raise not_found(f"no trainer '{model}': available are {sorted(app._trainers)}")
    store = app.datastore()
    if model == textdiff and not store.get_labeled_images() and not pseudo_labeled_cases(store):
        raise bad_request("no image has a final label yet: save at least one mask before training")
    if model == cdm:
        cfg = app._trainers[cdm].cfg
        found = {image_level_label(case, cfg) for case in read_studies(store.studies_dir)} - {None}
        if cfg.healthy_class not in found or len(found) < 2:
            raise bad_request(f"the cdm model learns from image-level labels and needs both healthy "
                              f"('{cfg.healthy_class}') and abnormal images; found {sorted(found) or 'none'}. "
                              "Set them with PUT /datastore/image/info {\"image_label\": ...} or in the reports")
