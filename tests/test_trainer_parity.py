"""The DeepSpeed trainer against a second implementation: a plain PyTorch AdamW loop with the same
initialisation, batches, schedule and clipping must produce the same losses (ZeRO-2, one process)."""

import pytest
import torch

from dbscale import families
from dbscale.create_run import prepare_run
from dbscale.models.llama import DenoiserBlock, LlamaLM, denoiser_loss, lm_loss
from dbscale.train.deepspeed_config import lr_lambda
from dbscale.train.metrics import read_metrics


@pytest.mark.parametrize(
    "block, zero_stage, switches, offload",
    [
        (1, 2, False, False),
        (None, 2, False, False),
        (0, 3, False, False),
        (None, 1, False, False),
        (1, 2, True, False),
        (0, 2, False, True),
    ],
    ids=["block-zero2", "e2e-zero2", "block-zero3", "e2e-zero1", "block-memory-switches", "block-zero2-offload"],
)
def test_deepspeed_trainer_matches_plain_torch(process_group, tiny_cfg, tmp_path, block, zero_stage, switches, offload):
    """Losses per step match, and the merged (consolidated) checkpoint equals the reference weights. With the
    memory switches (target-table head and context, chunked CE) the block's scalar logit scale goes through
    DeepSpeed too; with ZeRO-Offload the optimizer state lives in DeepSpeed's host-side partitions."""
    from dbscale.merge import consolidate
    from dbscale.train.trainer import Trainer, _seed

    model_switches = {"head": "target", "context_embedding": "target"} if switches else {}
    cfg = tiny_cfg(
        model=model_switches,
        train={
            "steps": 5,
            "save_every": 100,
            "val_every": 0,
            "grad_clip": 0.5,
            "weight_decay": 0.1,
            "zero_stage": zero_stage,
            "ce_chunk": 16 if switches else 0,
            "offload_optimizer": offload,
        },
    )
    run = prepare_run(cfg, tmp_path / "run", log=lambda *a: None)
    trainer = Trainer(run, block, rank=0, world_size=1)
    assert trainer.engine.zero_cpu_offload() is offload  # the config reaches DeepSpeed
    trainer.train()
    events = [e for e in read_metrics(run.job_dir(block) / "metrics.jsonl") if e["event"] == "train"]
    ds_losses = [e["loss"] for e in events]

    torch.manual_seed(_seed(cfg.train.seed, trainer.job_id, 17))
    if block is None:
        model = LlamaLM(cfg.model, run.vocab_size)
    else:
        table = run.load_target_embedding()
        model = DenoiserBlock(
            cfg.model,
            run.vocab_size,
            families.layer_allocation(cfg)[block],
            cfg.diffusion.sigma_data,
            table,
        )
    t = cfg.train
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=1e-8, weight_decay=t.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(t))
    ref_losses = []
    for step in range(t.steps):
        window, draw = trainer._batch(step, 0)
        if block is None:
            loss = lm_loss(model, window)
        else:
            weighting = cfg.diffusion.loss_weighting
            sigma, noise = draw
            d = cfg.diffusion
            loss, _ = denoiser_loss(model, window, table, sigma, noise, weighting, d.sigma_data, 0, d.prior_loss)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip)
        opt.step()
        sched.step()
        ref_losses.append(loss.item())
    assert ds_losses == pytest.approx(ref_losses, rel=2e-4, abs=1e-5)
    merged, source = consolidate(run, block, allow_unfinished=False)
    assert source["step"] == 5
    reference = model.state_dict()
    assert merged.keys() == reference.keys()
    for k, v in reference.items():
        torch.testing.assert_close(merged[k], v, rtol=1e-4, atol=1e-5, msg=k)
    assert events[-1]["ce"] < events[0]["ce"]  # and it learns (plain CE: a weighted loss swings with sigma)


@pytest.mark.parametrize("block", [0, None], ids=["block", "e2e"])
def test_activation_checkpointing_changes_nothing_but_memory(process_group, tiny_cfg, tmp_path, block):
    from dbscale.train.trainer import Trainer

    losses = {}
    for ac in (False, True):
        cfg = tiny_cfg(train={"steps": 4, "save_every": 100, "val_every": 0, "activation_checkpointing": ac})
        run = prepare_run(cfg, tmp_path / f"ac{ac}", log=lambda *a: None)
        trainer = Trainer(run, block, rank=0, world_size=1)
        assert trainer.engine.module.activation_checkpointing is ac  # the config reaches the model
        trainer.train()
        losses[ac] = [e["loss"] for e in read_metrics(run.job_dir(block) / "metrics.jsonl") if e["event"] == "train"]
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)  # memory: see test_models


def test_offload_can_be_switched_at_a_resume(process_group, tiny_cfg, tmp_path):
    """A job checkpointed without ZeRO-Offload resumes with it (a user who runs short of GPU memory), and back
    again, continuing the same optimizer state: the losses equal those of the job run straight through."""
    from dbscale.train.trainer import Trainer

    def losses(run):
        return {e["step"]: e["loss"] for e in read_metrics(run.job_dir(0) / "metrics.jsonl") if e["event"] == "train"}

    def train(run, offload, stop_after=None):
        run.config.train.offload_optimizer = offload
        trainer = Trainer(run, 0, 0, 1)
        assert trainer.engine.zero_cpu_offload() is offload
        if stop_after is not None:

            def stop(step):
                if step == stop_after:
                    raise KeyboardInterrupt  # stopped right after this step's checkpoint

            trainer.after_step = stop
        try:
            trainer.train()
        except KeyboardInterrupt:
            assert stop_after is not None
        finally:
            trainer.close()

    cfg = dict(steps=6, save_every=2, val_every=0, log_every=1, warmup_steps=1)
    straight = prepare_run(tiny_cfg(train=cfg), tmp_path / "straight", log=lambda *a: None)
    switched = prepare_run(tiny_cfg(train=cfg), tmp_path / "switched", log=lambda *a: None)
    train(straight, offload=False)
    train(switched, offload=False, stop_after=2)
    train(switched, offload=True, stop_after=4)
    train(switched, offload=False)
    a, b = losses(straight), losses(switched)
    assert sorted(b) == list(range(1, 7))
    assert b == pytest.approx(a, rel=1e-6, abs=1e-7)
