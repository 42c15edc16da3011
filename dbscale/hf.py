"""Hugging Face transformers interop for the Llama family.

dbscale's `LlamaLM` is a standard Llama-2 (RMSNorm, rotate-half RoPE, SwiGLU, GQA) with HF's parameter
names, so conversion is a prefix change: HF keeps the body under `model.` and `lm_head` at the top.

- `export_hf(merged_e2e, out)`: a merged end-to-end baseline -> an HF folder (config.json,
  model.safetensors, tokenizer.model + tokenizer.json) that `AutoModelForCausalLM.from_pretrained` loads.
- `import_hf(hf_dir, run)`: an HF Llama folder -> initial weights for a run's baseline and, with
  `blocks=True`, for each DiffusionBlocks block: block b takes the pretrained layers it owns, the pretrained
  embedding (its context embedding), final norm and head; its time embedder and input projection start fresh,
  its AdaLN modulation at zero with the gates open (the pretrained layers act from the first step), and the
  readout as the pretrained one (dbscale's posterior readout: out_proj the identity; the paper's block: its
  EDM readout at zero).
  This converts an existing model to block-wise continued training. Jobs pick the weights up from
  `R/init/` when they start without a checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from dbscale import families
from dbscale.config import ModelConfig
from dbscale.errors import RunError
from dbscale.files import atomic_write_json, sha256_file

INIT_DIR = "init"


def hf_config(cfg: ModelConfig, vocab_size: int, bos_id: int = 1, eos_id: int = 2):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_dim,
        num_hidden_layers=cfg.n_layers,
        num_attention_heads=cfg.n_heads,
        num_key_value_heads=cfg.kv_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.seq_len,
        rms_norm_eps=cfg.norm_eps,
        rope_theta=cfg.rope_theta,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        tie_word_embeddings=False,
        bos_token_id=bos_id,
        eos_token_id=eos_id,
        pad_token_id=None,
    )


def model_fields_from_hf(config: dict) -> dict:
    """The ModelConfig fields an HF Llama config.json implies."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    theta = config.get("rope_theta") or rope.get("rope_theta", 10000.0)
    return {
        "n_layers": config["num_hidden_layers"],
        "d_model": config["hidden_size"],
        "n_heads": config["num_attention_heads"],
        "n_kv_heads": config.get("num_key_value_heads") or config["num_attention_heads"],
        "ffn_hidden": config["intermediate_size"],
        "rope_theta": float(theta),
        "norm_eps": float(config.get("rms_norm_eps", 1e-5)),
    }


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {(k if k.startswith("lm_head.") else f"model.{k}"): v for k, v in state.items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], expected: set[str], where: str) -> dict[str, torch.Tensor]:
    """HF names -> dbscale LlamaLM names; raises naming every missing and unexpected key."""
    out = {}
    for k, v in state.items():
        if k.startswith("model."):
            out[k[len("model.") :]] = v
        elif k.startswith("lm_head."):
            out[k] = v
        else:
            out[k] = v  # reported as unexpected below
    out = {k: v for k, v in out.items() if not k.endswith("rotary_emb.inv_freq")}  # a buffer, recomputed
    missing, unexpected = sorted(expected - out.keys()), sorted(out.keys() - expected)
    if missing or unexpected:
        raise RunError(
            f"{where}: weights do not fit a Llama of this shape. Missing keys ({len(missing)}): {missing[:12]}; "
            f"unexpected keys ({len(unexpected)}): {unexpected[:12]}."
        )
    return out


def export_hf(merged_dir: str | Path, out_dir: str | Path) -> Path:
    """Write a merged end-to-end baseline as an HF Llama folder."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    from dbscale.merge import load_merged

    model, tokenizer, manifest = load_merged(merged_dir)
    if manifest.get("family", "llama") != "llama":
        raise RunError(f"{merged_dir}: transformers export needs a 'llama' model, not '{manifest['family']}'.")
    if manifest["kind"] != "e2e":
        raise RunError(
            f"{merged_dir}: holds DiffusionBlocks blocks, which are not a transformers architecture. Fix: export "
            "the end-to-end baseline (R/e2e/merged, made by tools/merge_blocks.py --e2e)."
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    hf = LlamaForCausalLM(hf_config(model.cfg, model.vocab_size, tokenizer.sp.bos_id(), tokenizer.eos_id))
    hf.load_state_dict(to_hf_state_dict(model.state_dict()), strict=True)
    hf.save_pretrained(out, safe_serialization=True)
    (out / "tokenizer.model").write_bytes(tokenizer.path.read_bytes())
    atomic_write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "LlamaTokenizer",
            "add_bos_token": False,
            "add_eos_token": False,
            "legacy": False,
            "bos_token": "<s>",
            "eos_token": "</s>",
            "unk_token": "<unk>",
            "model_max_length": model.cfg.seq_len,
        },
    )
    AutoTokenizer.from_pretrained(out).save_pretrained(out)  # adds tokenizer.json for the fast path
    atomic_write_json(out / "dbscale.json", {"source": str(merged_dir), "run_id": manifest["run_id"]})
    return out


def _read_hf_weights(hf_dir: Path) -> dict[str, torch.Tensor]:
    """safetensors only (single file or sharded index); pickled .bin files are loaded with weights_only."""
    from safetensors.torch import load_file

    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        state = {}
        for f in files:
            state.update(load_file(str(f)))
        return state
    bins = sorted(hf_dir.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for f in bins:
            state.update(torch.load(f, map_location="cpu", weights_only=True))
        return state
    raise RunError(f"{hf_dir}: no model.safetensors (or pytorch_model.bin) found.")


def read_hf_llama(hf_dir: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    hf_dir = Path(hf_dir)
    cfg_path = hf_dir / "config.json"
    if not cfg_path.is_file():
        raise RunError(f"{hf_dir}: not a Hugging Face model folder (no config.json).")
    config = json.loads(cfg_path.read_text())
    arch = config.get("architectures") or []
    if config.get("model_type") != "llama":
        raise RunError(
            f"{cfg_path}: model_type '{config.get('model_type')}' (architectures {arch}) is not a Llama; dbscale "
            "imports LlamaForCausalLM folders only."
        )
    if config.get("tie_word_embeddings") or config.get("attention_bias") or config.get("mlp_bias"):
        raise RunError(f"{cfg_path}: tied embeddings or attention/MLP biases are not supported by dbscale's Llama.")
    return config, _read_hf_weights(hf_dir)


def import_hf(hf_dir: str | Path, run_dir: str | Path, blocks: bool = False, log=print) -> Path:
    """Write `R/init/e2e.safetensors` (and `R/init/block_{b}.safetensors`) from an HF Llama folder."""
    from safetensors.torch import save_file

    from dbscale.models.layers import zero_init_adaln
    from dbscale.models.llama import LlamaLM, denoiser_block
    from dbscale.run import open_run

    hf_dir = Path(hf_dir)
    run = open_run(run_dir)
    config, hf_state = read_hf_llama(hf_dir)
    m = run.config.model
    wanted = model_fields_from_hf(config)
    have = {
        "n_layers": m.n_layers,
        "d_model": m.d_model,
        "n_heads": m.n_heads,
        "n_kv_heads": m.kv_heads,
        "ffn_hidden": m.ffn_dim,
        "rope_theta": m.rope_theta,
        "norm_eps": m.norm_eps,
    }
    diff = [f"model.{k}: run {have[k]} vs HF {wanted[k]}" for k in have if have[k] != wanted[k]]
    if diff:
        raise RunError(
            f"{hf_dir}: the HF model's shape differs from the run {run.root}: {'; '.join(diff)}. Fix: prepare a run "
            f"whose model section matches the HF config ({json.dumps(wanted)})."
        )
    if config["vocab_size"] != run.vocab_size:
        raise RunError(
            f"{hf_dir}: vocabulary of {config['vocab_size']} tokens, but the run's tokenizer has {run.vocab_size}. "
            f"Fix: prepare the run with data.tokenizer_model: {hf_dir / 'tokenizer.model'}."
        )
    hf_tok = hf_dir / "tokenizer.model"
    if hf_tok.is_file() and sha256_file(hf_tok) != run.manifest["tokenizer_sha256"]:
        raise RunError(
            f"{hf_tok}: differs from the run's tokenizer ({run.root / 'tokenizer/spm.model'}); token ids would not "
            f"mean the same. Fix: prepare the run with data.tokenizer_model: {hf_tok}."
        )

    with torch.device("meta"):
        expected = set(LlamaLM(m, run.vocab_size).state_dict())
    e2e = from_hf_state_dict(hf_state, expected, str(hf_dir))
    init = run.root / INIT_DIR
    init.mkdir(exist_ok=True)
    files = {}
    save_file({k: v.contiguous().float() for k, v in e2e.items()}, str(init / "e2e.safetensors"))
    files["e2e"] = "e2e.safetensors"
    if blocks:
        offset = 0
        table = run.load_target_embedding()
        for b, n in enumerate(families.layer_allocation(run.config)):
            torch.manual_seed(run.config.train.seed + 1000 + b)
            block = denoiser_block(m, run.vocab_size, n, run.config.diffusion.sigma_data, table)
            zero_init_adaln(block.layers, gate=1.0)  # adaLN-Zero would switch the pretrained layers off
            state = block.state_dict()
            if m.context_embedding == "learned":
                state["embed_tokens.weight"] = e2e["embed_tokens.weight"]
            for i in range(n):
                for k, v in e2e.items():
                    if k.startswith(f"layers.{offset + i}."):
                        state[f"layers.{i}." + k.split(".", 2)[2]] = v
            if m.block == "stream":  # an LM's norm and head over d: the pretrained readout of its last layer
                state["norm.weight"] = e2e["norm.weight"]
                state["lm_head.weight"] = e2e["lm_head.weight"]
            elif m.embed_dim == m.d_model and m.head == "learned":  # the head reads the target space; reuse it
                state["norm.weight"] = e2e["norm.weight"]
                state["lm_head.weight"] = e2e["lm_head.weight"]
                if m.block != "paper":  # head(norm(h)): the pretrained readout of the block's last layer
                    state["out_proj.weight"] = torch.eye(m.d_model)
            offset += n
            name = f"block_{b}.safetensors"
            save_file({k: v.contiguous().float() for k, v in state.items()}, str(init / name))
            files[str(b)] = name
    atomic_write_json(
        init / "manifest.json",
        {
            "source": str(hf_dir.resolve()),
            "run_id": run.run_id,
            "files": {job: {"file": f, "sha256": sha256_file(init / f)} for job, f in files.items()},
        },
    )
    log(f"[import] {hf_dir} -> {init} ({', '.join(files)})")
    return init


def load_init_weights(run, block: int | None) -> dict[str, torch.Tensor] | None:
    """The verified initial weights for a job from `R/init/`, or None when the run has none for it."""
    from safetensors.torch import load_file

    manifest_path = run.root / INIT_DIR / "manifest.json"
    if not manifest_path.is_file():
        return None
    manifest = json.loads(manifest_path.read_text())
    if manifest.get("run_id") != run.run_id:
        raise RunError(f"{manifest_path}: initial weights were imported into another run ({manifest.get('run_id')}).")
    entry = manifest["files"].get("e2e" if block is None else str(block))
    if entry is None:
        return None
    path = run.root / INIT_DIR / entry["file"]
    if not path.is_file() or sha256_file(path) != entry["sha256"]:
        raise RunError(f"{path}: missing or changed since import. Fix: run tools/import_hf.py again.")
    return load_file(str(path))
