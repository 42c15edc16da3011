"""The training loop of one job: a DiffusionBlocks block (`block=b`) or the end-to-end baseline (`block=None`).

A job reads only the run's frozen files and writes only its own directory (blocks/b/ or e2e/). It resumes
from its newest intact checkpoint automatically (the Checkpointer of dbscale/train/checkpoint.py). Data windows
and noise are functions of (seed, step, rank), so a resumed job reproduces the losses of an uninterrupted one
exactly.
"""

from __future__ import annotations

import dataclasses
import signal
import time

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dbscale import families
from dbscale.data.khop import window_stride
from dbscale.errors import CheckpointError, DbscaleError, RunError
from dbscale.families import StepInfo
from dbscale.families import derive_seed as _seed
from dbscale.hf import load_init_weights
from dbscale.run import Run
from dbscale.train import checkpoint as ckpt
from dbscale.train.deepspeed_config import deepspeed_config, lr_lambda
from dbscale.train.host_memory import set_mmap_threshold
from dbscale.train.lock import JobLock
from dbscale.train.metrics import MetricsLogger, peak_memory_bytes
from dbscale.train.stacking import check_predecessors, load_predecessors


class TrainingError(DbscaleError):
    """Training cannot continue (non-finite loss, ...); the last checkpoint is intact."""


def train_step(engine, family, job, window, draw, step: StepInfo, accept=None):
    """One micro-batch: the family's loss, backward and the optimizer step through `engine` (a DeepSpeed engine,
    or `PlainEngine` for in-process jobs: the calibration and the benches). `accept(loss)` may refuse the loss
    before backward (a non-finite one). Returns (loss, per-sequence CE, whether the step was taken)."""
    loss, ce = family.loss(job, engine, window, draw, step)
    if accept is not None and not accept(loss):
        return loss, ce, False
    engine.backward(loss)
    engine.step()
    return loss, ce, True


class PlainEngine:
    """DeepSpeed's training interface (module, forward, backward, step) over plain torch AdamW with the run's
    warm-up/decay schedule and gradient clipping: the same optimizer a block job runs, in one process."""

    def __init__(self, model, train_cfg, schedule=None):
        """schedule: the LR multiplier per step (default: the run's warm-up and decay, train_cfg's)."""
        t = train_cfg
        self.module, self.train_cfg = model, t
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=t.lr, betas=tuple(t.betas), eps=1e-8, weight_decay=t.weight_decay
        )
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule or lr_lambda(t))

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)

    def backward(self, loss) -> None:
        loss.backward()

    def step(self) -> None:
        if self.train_cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.module.parameters(), self.train_cfg.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)


class Trainer:
    def __init__(self, run: Run, block: int | None, rank: int, world_size: int):
        import deepspeed

        self.run, self.block, self.rank, self.world = run, block, rank, world_size
        self.cfg = run.config
        if block is not None and not 0 <= block < run.num_blocks:
            raise RunError(f"--block {block}: this run has blocks 0..{run.num_blocks - 1} (diffusion.num_blocks).")
        self.job = f"block {block}" if block is not None else "e2e"
        self.job_dir = run.job_dir(block)
        self.job_id = 0 if block is None else block + 1
        self.lock = JobLock(self.job_dir, f"{self.job} of {run.root}")
        self._on_rank0_then_all(self.lock.acquire)
        try:
            self._build(deepspeed)
        except BaseException:
            self.lock.release()  # a job that never started must not leave its directory locked
            raise

    def _build(self, deepspeed) -> None:
        run, block, cfg, world_size, rank = self.run, self.block, self.cfg, self.world, self.rank
        set_mmap_threshold(cfg.train.host_mmap_threshold)  # before the model's and the step's allocations
        self.family = families.get(cfg.model.family)
        self.family_job = self.family.job(run, block)  # its slice, the frozen target table, ...
        self.window_len = self.family.window_length(cfg)
        torch.manual_seed(_seed(cfg.train.seed, self.job_id, 17))  # same init on every rank
        model = self.family.build(self.family_job)
        model.activation_checkpointing = cfg.train.activation_checkpointing
        self.predecessors = None  # stacked context: the frozen blocks this one reads, as its checkpoints record
        if block and cfg.diffusion.stack_context:
            frozen, self.predecessors = load_predecessors(run, block, self.family)
            model.read_from(frozen)
        init = load_init_weights(run, block)  # imported weights (tools/import_hf.py); a checkpoint overrides them
        if init is not None:
            model.load_state_dict(init, strict=True)
        self.initialised_from = "init" if init is not None else "random"
        self.num_params = sum(p.numel() for p in model.parameters())

        self.checkpoints = ckpt.Checkpointer(
            self.job_dir,
            run.run_id,
            block,
            rank,
            world_size,
            self.job,
            lambda *a, **fields: self.logger.log(*a, **fields),  # (the logger opens once the engine exists)
            run.manifest["tokenizer_sha256"],
            predecessors=self.predecessors,
        )
        # the batch split may change, to resume on another process count
        train = self.checkpoints.plan(cfg.train, extra_check=self._check_predecessors)
        self.cfg = cfg = dataclasses.replace(cfg, train=train)
        self.schedule = self.checkpoints.schedule
        ds_config = deepspeed_config(cfg.train, world_size)
        if self.checkpoints.universal:
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train, self.schedule)),
        )
        self.device = self.engine.device
        self.train_shards = run.shards("train")
        self.val_shards = run.shards("val")
        self.logger = MetricsLogger(self.job_dir, enabled=rank == 0)
        self.stop_requested = False

    def _on_rank0_then_all(self, fn) -> None:
        """Run fn on rank 0; if it raises a DbscaleError, raise the same error on every rank (no rank hangs)."""
        error = [None]
        if self.rank == 0:
            try:
                fn()
            except DbscaleError as e:
                error = [(type(e).__name__, str(e))]
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            kind, message = error[0]
            raise {"RunError": RunError, "CheckpointError": CheckpointError}.get(kind, DbscaleError)(message)

    def close(self) -> None:
        self.lock.release()

    # ---------------------------------------------------------------------------------------------------
    def _batch(self, step: int, micro: int, validation: bool = False):
        """(window, the family's draw) of one micro-batch, a pure function of (seed, step, rank, micro)."""
        t, mb = self.cfg.train, self.cfg.train.micro_batch
        length = self.window_len
        if validation:
            windows = self._val_windows[micro * mb : (micro + 1) * mb]
        else:  # the same data stream for every job of the run: blocks and baseline see the same windows
            # Seeded by the micro-batch's global index within the step, so W ranks x G accumulation steps draw
            # the same data as one rank accumulating W*G micro-batches (with one rank: index = micro).
            rng = np.random.default_rng(_seed(t.seed, step, 0, self._global_micro(micro), 1))
            windows = self.train_shards.random_windows(rng, mb, length, window_stride(self.cfg.data))
        window = torch.from_numpy(windows).to(self.device)
        index = micro if validation else self._global_micro(micro)
        noise_seed = _seed(t.seed, self.job_id, step, 0, index, 2 if not validation else 3)
        return window, self.family.draw(self.family_job, window, noise_seed)

    def _global_micro(self, micro: int) -> int:
        return self.rank * self.cfg.train.grad_accum + micro

    def _loss(self, window, draw, index: int = -1):  # -1: not a training micro-batch (validation)
        return self.family.loss(
            self.family_job, self.engine, window, draw, StepInfo(self.cfg.train.seed, index, self.rank)
        )

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Loss on fixed validation windows (and, for a block, fixed noise), averaged over all ranks."""
        self.engine.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for micro in range(self.cfg.train.val_batches):
            if micro % self.world != self.rank:
                continue
            window, draw = self._batch(0, micro, validation=True)
            loss, ce = self._loss(window, draw)
            total += torch.tensor(
                [loss.item() * len(ce), ce.sum().item(), len(ce)], dtype=torch.float64, device=self.device
            )
        dist.all_reduce(total)
        self.engine.train()
        out = {
            "val_loss": total[0].item() / max(total[2].item(), 1),
            "val_ce": total[1].item() / max(total[2].item(), 1),
        }
        self.logger.log("val", step, **out)
        return out

    # ---------------------------------------------------------------------------------------------------
    def save(self, step: int) -> None:
        self.checkpoints.save(self.engine, step)

    def resume(self) -> int:
        return self.checkpoints.resume(self.engine)

    def _check_predecessors(self, info: ckpt.CheckpointInfo) -> None:
        if self.predecessors is not None:
            check_predecessors(info.path, self.block, info.marker.get("predecessors"), self.predecessors)

    def after_step(self, step: int) -> None:
        """Called after every completed step (and its checkpoint, if one was due). Does nothing; a seam where
        tests inject faults into a real job (tests/hooks/sitecustomize.py), so none is read here."""

    def _handle_signal(self, signum, frame):
        self.stop_requested = True

    def _mean_over_ranks(self, losses: list[float], ces: list[float]) -> tuple[float | None, float | None]:
        """The step's loss and CE averaged over every micro-batch of every rank (what the optimizer saw)."""
        if not losses:
            return None, None
        t = torch.tensor([sum(losses), sum(ces), len(losses)], dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return (t[0] / t[2]).item(), (t[1] / t[2]).item()

    def _agree(self, flag: bool) -> bool:
        t = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return bool(t.item())

    def train(self) -> dict:
        """Train to train.steps (resuming first); the job lock is released however this ends."""
        try:
            return self._train()
        finally:
            self.close()

    def _train(self) -> dict:
        t = self.cfg.train
        start = self.resume()
        stride = window_stride(self.cfg.data)
        self._val_windows = self.val_shards.fixed_windows(t.val_batches * t.micro_batch, self.window_len, 0, stride)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle_signal)
        tokens_per_step = t.micro_batch * t.grad_accum * self.world * self.cfg.model.seq_len
        self.logger.log(
            "start",
            start,
            job=self.job,
            world_size=self.world,
            steps=t.steps,
            params=self.num_params,
            zero_stage=t.zero_stage,
            tokens_per_step=tokens_per_step,
            device=str(self.device),
            initialised_from=self.initialised_from if start == 0 else "checkpoint",
        )
        bar = tqdm(
            total=t.steps,
            initial=start,
            desc=f"[{self.run.config.name}] {self.job}",
            unit="step",
            disable=True if self.rank != 0 else None,  # None: no bar when the output is not a terminal
            mininterval=1.0,
            dynamic_ncols=True,
        )
        # without a bar (a log file, a batch job) one progress line every tenth of the job, on rank 0
        report_every = max(t.log_every, t.steps // 10) if (self.rank == 0 and bar.disable) else 0
        last_val: dict = {}
        nonfinite = 0
        step = start
        window_t0, window_steps = time.time(), 0
        self.engine.train()
        while step < t.steps:
            step_t0 = time.time()
            losses, ces = [], []
            for micro in range(t.grad_accum):
                window, draw = self._batch(step, micro)
                info = StepInfo(t.seed, step * t.grad_accum + micro, self.rank)
                finite = lambda loss: not self._agree(not torch.isfinite(loss).item())  # noqa: E731
                loss, ce, stepped = train_step(self.engine, self.family, self.family_job, window, draw, info, finite)
                if not stepped:  # a non-finite loss, found before backward: the weights stay as they are
                    nonfinite += 1
                    self.logger.log("nonfinite", step + 1, job=self.job, count=nonfinite, loss=str(loss.item()))
                    if nonfinite > t.max_nonfinite_steps:
                        raise TrainingError(
                            f"{self.job}: non-finite loss ({loss.item()}) at step {step + 1} (the "
                            f"{nonfinite}th; train.max_nonfinite_steps={t.max_nonfinite_steps}). The weights were "
                            f"not updated and the last checkpoint in {self.job_dir} is intact. Fix: lower train.lr, "
                            "check the data, or allow skipping with train.max_nonfinite_steps."
                        )
                    bar.write(f"[{self.job}] step {step + 1}: non-finite loss, step skipped ({nonfinite} so far)")
                    break
                losses.append(loss.item())
                ces.append(ce.mean().item())
            step += 1
            window_steps += 1
            bar.update(1)
            if step % t.log_every == 0 or step == t.steps:
                elapsed = time.time() - window_t0
                mean_loss, mean_ce = self._mean_over_ranks(losses, ces)
                record = {  # a skipped (non-finite) step has no loss to report
                    "loss": mean_loss,
                    "ce": mean_ce,
                    "lr": self.scheduler.get_last_lr()[0],
                    "tokens_per_s": tokens_per_step * window_steps / max(elapsed, 1e-9),
                    "step_time_s": time.time() - step_t0,
                    "peak_mem_bytes": peak_memory_bytes(),
                }
                self.logger.log("train", step, **record)
                if report_every and losses and (step % report_every == 0 or step == t.steps):
                    print(
                        f"[{self.job}] step {step}/{t.steps}: loss {record['loss']:.4g}, ce {record['ce']:.3f}, "
                        f"{record['tokens_per_s']:,.0f} tok/s",
                        flush=True,
                    )
                if losses:
                    bar.set_postfix(
                        loss=f"{record['loss']:.4g}", ce=f"{record['ce']:.3f}", tok_s=f"{record['tokens_per_s']:.0f}"
                    )
                window_t0, window_steps = time.time(), 0
            if (t.val_every and step % t.val_every == 0) or step == t.steps:
                last_val = self.validate(step)
                bar.write(
                    f"[{self.job}] step {step}: val_loss {last_val['val_loss']:.4g}, val_ce {last_val['val_ce']:.4f}"
                )
            stop = self._agree(self.stop_requested)
            if step % t.save_every == 0 or step == t.steps or stop:
                self.save(step)
            self.after_step(step)
            if stop:
                self.logger.log("stopped", step, reason="signal")
                bar.write(f"[{self.job}] stopped by signal at step {step}; checkpoint saved, rerun to resume.")
                break
        bar.close()
        if step >= t.steps and not last_val:  # resumed a finished job
            last_val = self.validate(step)
        self.logger.log("end", step, **last_val)
        self.logger.close()
        return {"step": step, **last_val}
