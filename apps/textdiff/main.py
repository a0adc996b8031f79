"""TextDiff Label: a MONAI Label app that segments images from a frozen diffusion backbone and their reports.

Start it with `monailabel start_server --app apps/textdiff --studies sample-data/train --host 127.0.0.1`. Settings
are `--conf key value` pairs (see lib/configs/settings.py and docs/app.md). The model code lives in the `textdiff`
package; this app only wires it into MONAI Label, turns bad client input into 4xx answers, and serves its own
versions of the endpoints MONAI Label ships unsafe (lib/endpoints).
"""

from __future__ import annotations

import logging
import os

import monailabel
import torch
from lib import endpoints
from lib.configs.cdm import CDMTaskConfig
from lib.configs.textdiff import TextDiffTaskConfig
from lib.datastore import ReportDatastore
from lib.dicomweb import ReportDICOMwebDatastore, cache_folder
from lib.errors import bad_request, check_id, not_found
from lib.endpoints.infer import UPLOAD
from lib.trainers.textdiff import pseudo_labeled_cases
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from textdiff.weak.cdm import image_level_label
from textdiff.data.studies import ImageLimits, read_studies, set_image_limits

logger = logging.getLogger(__name__)

MODEL = "textdiff"
PRETRAIN = "diffusion_pretrain"
CDM = "cdm"


class MyApp(MONAILabelApp):
    def __init__(self, app_dir, studies, conf):
        self.model = TextDiffTaskConfig()
        self.model.init(MODEL, os.path.join(app_dir, "model"), conf, None, app_dir=app_dir)
        set_image_limits(ImageLimits(self.model.settings.max_image_pixels, self.model.settings.max_volume_voxels))
        self.cdm = CDMTaskConfig()
        self.cdm.init(CDM, os.path.join(app_dir, "model"), conf, None, app_dir=app_dir,
                      backbone_for_training=self.model.backbone_for_training, labels=self.model.labels)
        super().__init__(
            app_dir=app_dir, studies=studies, conf=conf, name="TextDiff Label",
            description="Label-efficient segmentation from a frozen diffusion model and the images' reports",
            # a list: OHIF's MONAI Label panel appends to the top-level labels (each model's /info has the indices)
            version=monailabel.__version__, labels=list(self.model.labels),
        )

    # --- tasks -----------------------------------------------------------------------------------------------
    def init_datastore(self):
        if self.studies.startswith(("http://", "https://")):
            return ReportDICOMwebDatastore(self.studies, cache_folder(self.model.settings.model_dir),
                                           self.model.cfg.head.label_names)
        return ReportDatastore(self.studies, num_classes=len(self.model.cfg.head.label_names),
                               auto_reload=settings.MONAI_LABEL_DATASTORE_AUTO_RELOAD,
                               read_only=settings.MONAI_LABEL_DATASTORE_READ_ONLY)

    def init_infers(self):
        return {**self.model.infer(), **self.cdm.infer()}

    def init_trainers(self):
        return {MODEL: self.model.trainer(), PRETRAIN: self.model.pretrainer(), CDM: self.cdm.trainer()}

    def init_strategies(self):
        return {"random": Random(), "first": First(), **self.model.strategy()}

    def init_scoring_methods(self):
        return self.model.scoring_method()

    def server_mode(self, mode: bool):
        """Called once the server starts: the app's own endpoints replace MONAI Label's unsafe ones (lib/endpoints)."""
        super().server_mode(mode)
        if mode:
            from monailabel.app import app as server  # the FastAPI app: imported only by a server, not by its jobs

            conf = self.model.settings
            origins = [o.strip() for o in conf.cors_origins.split(",") if o.strip()]
            endpoints.install(server, max_upload_bytes=conf.max_upload_mb << 20,
                              infer_workers=max(1, conf.infer_workers), infer_queue=max(0, conf.infer_queue),
                              cors_origins=origins or [str(o) for o in settings.MONAI_LABEL_CORS_ORIGINS],
                              pacs=self.studies.startswith(("http://", "https://")))

    # --- request checks: clear 4xx answers instead of MONAI Label's 500s --------------------------------------
    def infer(self, request, datastore=None):
        model = request.get("model")
        if model not in self._infers:
            raise not_found(f"no model '{model}': available are {sorted(self._infers)}")
        if not self._infers[model].is_valid():
            raise not_found(f"model '{model}' has no weights yet: train it first (POST /train/{model})")
        image = request.get("image")
        if not isinstance(image, str) or not image:
            raise bad_request("say which image to segment: ?image=<id>")
        if image != request.get(UPLOAD):  # only the endpoint sets it, for the file of this very request
            check_id(image)
            if image not in self.datastore().list_images():
                raise not_found(f"no image '{image}' in the datastore")
            info = self.datastore().get_image_info(image)
            request = {**request, "report": info.get("report", ""), "stored_label": info.get("image_label")}
        return super().infer(request, datastore)

    def batch_infer(self, request, datastore=None):
        """`POST /batch/infer/cdm?images=unlabeled` pre-annotates every unlabeled image as an `original` label.
        MONAI Label 0.8.5 spreads batch jobs over GPUs by default and divides by zero on a CPU-only server."""
        if request.get("model") not in self._infers:
            raise not_found(f"no model '{request.get('model')}': available are {sorted(self._infers)}")
        request = {key: value for key, value in request.items() if not key.startswith("_")}  # server-set keys
        if not torch.cuda.is_available():
            request = {**request, "multi_gpu": False, "device": "cpu"}
        return super().batch_infer(request, datastore)

    def next_sample(self, request):
        strategy = request.get("strategy") or "random"
        if strategy not in self._strategies:
            raise not_found(f"no active-learning strategy '{strategy}': available are {sorted(self._strategies)}")
        return super().next_sample(request)

    def scoring(self, request, datastore=None):
        method = request.get("method")
        if method not in self._scoring_methods:
            raise not_found(f"no scoring method '{method}': available are {sorted(self._scoring_methods)}")
        return super().scoring(request, datastore)

    def bundle_path(self, model):
        """MONAI Label asks this in the server process just before it starts a background train or scoring job:
        the one place to refuse a job that cannot run with a 4xx, instead of a subprocess that fails later."""
        if model is not None and model not in self._trainers:
            raise not_found(f"no trainer '{model}': available are {sorted(self._trainers)}")
        store = self.datastore()
        if model == MODEL and not store.get_labeled_images() and not pseudo_labeled_cases(store):
            raise bad_request("no image has a final label yet: save at least one mask before training")
        if model == CDM:
            self._check_image_labels(store)
        return super().bundle_path(model)

    def _check_image_labels(self, store) -> None:
        """The CDM needs healthy and abnormal images, known from image labels or reports."""
        found = {image_level_label(case, self.cdm.cfg) for case in read_studies(store.studies_dir)} - {None}
        if self.cdm.cfg.healthy_class not in found or len(found) < 2:
            raise bad_request(f"the cdm model learns from image-level labels and needs both healthy "
                              f"('{self.cdm.cfg.healthy_class}') and abnormal images; found {sorted(found) or 'none'}. "
                              "Set them with PUT /datastore/image/info {\"image_label\": ...} or in the reports")


