"""TextDiff Label: a MONAI Label app that segments images from a frozen diffusion backbone and their reports.

Start it with `monailabel start_server --app apps/textdiff --studies sample-data/train --host 127.0.0.1`. Settings
are `--conf key value` pairs (see lib/configs/settings.py and docs/app.md). The model code lives in the `textdiff`
package; this app only wires it into MONAI Label, turns bad client input into 4xx answers, and serves its own
versions of the endpoints MONAI Label ships unsafe; every request check is in lib/endpoints.
"""

from __future__ import annotations

import logging
import os

import monailabel
from lib import endpoints, jobs
from lib.endpoints import checks
from lib.configs.cdm import CDMTaskConfig
from lib.configs.textdiff import TextDiffTaskConfig
from lib.datastore import ReportDatastore
from lib.dicomweb import ReportDICOMwebDatastore, cache_folder
from lib.proposals import proposal_dice
from monailabel.config import settings
from monailabel.interfaces.app import MONAILabelApp
from monailabel.tasks.activelearning.first import First
from monailabel.tasks.activelearning.random import Random
from textdiff.data.studies import ImageLimits, set_image_limits

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
        """`uncertainty` first (the default: docs/results/active-learning.md), as Slicer's and OHIF's lists show it."""
        return {**self.model.strategy(), "random": Random(), "first": First()}

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
                              pacs=self.studies.startswith(("http://", "https://")), viewer_dir=conf.viewer_dir,
                              trusted=conf.trusted_networks)

    def info(self):
        """MONAI Label's /info, with how good the CDM's masks are where final masks exist: scored at the end of its
        training run (`final_mask_dice`) and its stored proposals against what clinicians saved (`proposal_dice`)."""
        meta = super().info()
        if CDM in meta["models"]:
            meta["models"][CDM]["final_mask_dice"] = self._trainers[CDM].stats().get("final_mask_dice")
            meta["models"][CDM]["proposal_dice"] = proposal_dice(self.datastore(), CDM)
        return meta

    # --- MONAI Label's routes, checked first (lib/endpoints/checks.py): clear 4xx answers instead of 500s ----------
    def infer(self, request, datastore=None):
        return super().infer(checks.infer_request(self, request), datastore)

    def train(self, request):
        self._yield_if_background()
        return super().train(request)

    def batch_infer(self, request, datastore=None):
        """`POST /batch/infer/cdm?images=unlabeled` pre-annotates every unlabeled image as an `original` label."""
        self._yield_if_background()
        return super().batch_infer(checks.batch_infer_request(self, request), datastore)

    def next_sample(self, request):
        strategy = request.get("strategy") or "uncertainty"
        checks.known("active-learning strategy", strategy, self._strategies)
        return super().next_sample(request)

    def scoring(self, request, datastore=None):
        checks.known("scoring method", request.get("method"), self._scoring_methods)
        self._yield_if_background()
        return super().scoring(request, datastore)

    def _yield_if_background(self):
        conf = self.model.settings
        jobs.yield_to_requests(conf.job_nice, conf.train_threads)

    def bundle_path(self, model):
        """MONAI Label asks this in the server process just before it starts a background train or scoring job:
        the one place to refuse a job that cannot run with a 4xx, instead of a subprocess that fails later."""
        checks.job(self, model, MODEL, CDM)
        return super().bundle_path(model)
