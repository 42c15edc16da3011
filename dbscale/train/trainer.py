"""The training loop of one job: a DiffusionBlocks block (`block=b`) or the end-to-end baseline (`block=None`).

A job reads only the run's frozen files and writes only its own directory (blocks/b/ or e2e/). It resumes
from its newest intact checkpoint automatically. Data windows and noise are functions of (seed, step, rank),
so a resumed job reproduces the losses of an uninterrupted one exactly.
"""

from __future__ import annotations

import os
import shutil
import signal
import time
from contextlib import ExitStack

import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from dbscale.diffusion.masking import schedule_from_config, stratified_times
from dbscale.diffusion.noise import sample_truncated_lognormal
from dbscale.errors import CheckpointError, DbscaleError, RunError
from dbscale.hf import load_init_weights
from dbscale.models.huginn import HuginnDenoiser, HuginnLM, sample_recurrence
from dbscale.models.llama import DenoiserBlock, LlamaLM, block_reads_table, denoiser_loss, lm_loss
from dbscale.models.masked import MaskedDenoiser, masked_elbo_terms
from dbscale.run import Run
from dbscale.train import checkpoint as ckpt
from dbscale.train.deepspeed_config import deepspeed_config, lr_lambda
from dbscale.train.lock import JobLock
from dbscale.train.metrics import MetricsLogger, peak_memory_bytes


class TrainingError(DbscaleError):
    """Training cannot continue (non-finite loss, ...); the last checkpoint is intact."""


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1, dtype=np.uint64)[0] >> 1)


class Trainer:
    def __init__(self, run: Run, block: int | None, rank: int, world_size: int):
        import deepspeed

        self.run, self.block, self.rank, self.world = run, block, rank, world_size
        self.cfg = run.config
        if block is not None and not 0 <= block < run.num_blocks:
            raise RunError(f"--block {block}: this run has blocks 0..{run.num_blocks - 1} (diffusion.num_blocks).")
        if block is not None and run.manifest["partition"].get("pending"):
            raise RunError(
                f"{run.root}: the noise partition is still to be calibrated (diffusion.boundaries: null); a block "
                f"cannot know its slice. Fix: run tools/prepare.py again with the same --config and --run (it "
                f"finishes the calibration), or tools/calibrate_noise.py --run {run.root}."
            )
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
        torch.manual_seed(_seed(cfg.train.seed, self.job_id, 17))  # same init on every rank
        self.masked = cfg.model.family == "masked"
        self.window_len = cfg.model.seq_len if self.masked else cfg.model.seq_len + 1
        if self.masked:  # a block owns its slice of t; the baseline is the same denoiser over all of [0, 1]
            n_layers = cfg.model.n_layers if block is None else cfg.layer_allocation()[block]
            model = MaskedDenoiser(cfg.model, run.vocab_size, n_layers)
            lo, hi = (0.0, 1.0) if block is None else run.manifest["partition"]["train_intervals"][block]
            self.interval, self.schedule = (lo, hi), schedule_from_config(cfg.diffusion)
        elif cfg.model.family == "huginn" and block is None:
            model = HuginnLM(cfg.model, run.vocab_size)
        elif block is None:
            model = LlamaLM(cfg.model, run.vocab_size)
        else:
            n_layers = cfg.layer_allocation()[block]
            table = run.load_target_embedding()  # one copy: the noisy targets, and the head/context if they read it
            reads_table = block_reads_table(cfg.model)
            if cfg.model.family == "huginn":
                model = HuginnDenoiser(
                    cfg.model, run.vocab_size, cfg.diffusion.sigma_data, table if reads_table else None
                )
            else:
                model = DenoiserBlock(
                    cfg.model, run.vocab_size, n_layers, cfg.diffusion.sigma_data, table if reads_table else None
                )
            self.interval = tuple(run.manifest["partition"]["train_intervals"][block])
        model.activation_checkpointing = cfg.train.activation_checkpointing
        init = load_init_weights(run, block)  # imported weights (tools/import_hf.py); a checkpoint overrides them
        if init is not None:
            model.load_state_dict(init, strict=True)
        self.initialised_from = "init" if init is not None else "random"
        self.num_params = sum(p.numel() for p in model.parameters())

        ds_config = deepspeed_config(cfg.train, world_size)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=model,
            model_parameters=[p for p in model.parameters() if p.requires_grad],
            config=ds_config,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg.train)),
        )
        self.device = self.engine.device
        if block is not None and not self.masked:
            self.target_embedding = table.to(self.device)
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
        """(window, sigma, noise) of one micro-batch, a pure function of (seed, step, rank, micro)."""
        t, mb = self.cfg.train, self.cfg.train.micro_batch
        length = self.window_len
        if validation:
            windows = self._val_windows[micro * mb : (micro + 1) * mb]
        else:  # the same data stream for every job of the run: blocks and baseline see the same windows
            # Seeded by the micro-batch's global index within the step, so W ranks x G accumulation steps draw
            # the same data as one rank accumulating W*G micro-batches (with one rank: index = micro).
            rng = np.random.default_rng(_seed(t.seed, step, 0, self._global_micro(micro), 1))
            windows = self.train_shards.random_windows(rng, mb, length)
        window = torch.from_numpy(windows).to(self.device)
        if self.block is None and not self.masked:
            return window, None, None
        d = self.cfg.diffusion
        index = micro if validation else self._global_micro(micro)
        noise_seed = _seed(t.seed, self.job_id, step, 0, index, 2 if not validation else 3)
        g = torch.Generator().manual_seed(noise_seed)
        if self.masked:  # t stratified across the micro-batch within the slice; u decides which tokens are masked
            times = stratified_times(len(windows), *self.interval, generator=g)
            g_dev = torch.Generator(device=self.device).manual_seed(noise_seed)
            u = torch.rand(window.shape, generator=g_dev, device=self.device)
            return window, times.to(self.device), u
        sigma = sample_truncated_lognormal(len(windows), *self.interval, d.P_mean, d.P_std, generator=g)
        g_dev = torch.Generator(device=self.device).manual_seed(noise_seed)  # noise is drawn where it is used
        shape = (len(windows), length - 1, self.cfg.model.embed_dim)
        noise = torch.randn(shape, generator=g_dev, device=self.device)
        return window, sigma.float().to(self.device), noise

    def _global_micro(self, micro: int) -> int:
        return self.rank * self.cfg.train.grad_accum + micro

    def _loss(self, window, sigma, noise):
        if self.masked:  # (sigma, noise) are (t, u) here
            lo, hi = self.interval
            nelbo, masked_ce = masked_elbo_terms(
                self.engine,
                window,
                sigma,
                noise,
                self.schedule,
                hi - lo,
                self.cfg.diffusion.t_min,
                self.run.vocab_size,
                self.cfg.train.ce_chunk,
            )
            return nelbo.mean(), masked_ce
        if self.block is None:
            if isinstance(self.engine.module, HuginnLM) and self.engine.module.training:
                m = self.cfg.model  # r and the initial state: functions of (seed, step), the same on every rank
                step = self._step_for_recurrence
                r = sample_recurrence(
                    np.random.default_rng(_seed(self.cfg.train.seed, step, 4)), m.mean_recurrence, m.recurrence_std
                )
                self.engine.module.recurrence = (r, m.bptt_steps, _seed(self.cfg.train.seed, step, self.rank, 5))
                self.last_recurrence = r
            loss = lm_loss(self.engine, window, self.cfg.train.ce_chunk)
            return loss, loss.detach().expand(window.shape[0])
        d = self.cfg.diffusion
        return denoiser_loss(
            self.engine,
            window,
            self.target_embedding,
            sigma,
            noise,
            d.loss_weighting,
            d.sigma_data,
            self.cfg.train.ce_chunk,
        )

    @torch.no_grad()
    def validate(self, step: int) -> dict:
        """Loss on fixed validation windows (and, for a block, fixed noise), averaged over all ranks."""
        self.engine.eval()
        total = torch.zeros(3, dtype=torch.float64, device=self.device)
        for micro in range(self.cfg.train.val_batches):
            if micro % self.world != self.rank:
                continue
            window, sigma, noise = self._batch(0, micro, validation=True)
            loss, ce = self._loss(window, sigma, noise)
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
    def _identity(self, step: int) -> dict:
        return {
            "run_id": self.run.run_id,
            "block": self.block,
            "step": step,
            "world_size": self.world,
            "zero_stage": self.cfg.train.zero_stage,
            "tokenizer_sha256": self.run.manifest["tokenizer_sha256"],
        }

    def save(self, step: int) -> None:
        """Write a checkpoint and publish it (marker, then `latest`). If writing fails on any rank (a full
        disk, a quota), the partial tag is removed, `latest` still names the previous checkpoint, and the
        job stops with a CheckpointError."""
        tag = ckpt.tag_for(step)
        tag_dir = self.job_dir / tag
        if self.rank == 0 and tag_dir.exists():  # a damaged or unfinished tag at this step: replace it
            shutil.rmtree(tag_dir)
        dist.barrier()
        failure = None
        try:
            self.engine.save_checkpoint(
                str(self.job_dir), tag=tag, client_state=self._identity(step), save_latest=False
            )
            files = ckpt.hash_files(ckpt.rank_files(tag_dir, self.rank))
        except (OSError, RuntimeError) as e:  # torch's zip writer reports a full disk as a RuntimeError
            failure, files = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300]}", {}
        gathered = [None] * self.world
        dist.all_gather_object(gathered, (str(failure) if failure else None, files))
        failures = [f for f, _ in gathered if f]
        if self.rank == 0 and not failures:
            try:
                merged = {k: v for _, part in gathered for k, v in part.items()}
                ckpt.write_marker(self.job_dir, tag, self._identity(step), merged)
                ckpt.write_latest(self.job_dir, tag)
                ckpt.fsync_dir(self.job_dir)
            except OSError as e:
                failures.append(str(e))
                (tag_dir / ckpt.MARKER).unlink(missing_ok=True)
        failures = [f for f in self._gather_failures(failures) if f]
        if failures:
            if self.rank == 0:
                shutil.rmtree(tag_dir, ignore_errors=True)
                self.logger.log("checkpoint_failed", step, tag=tag, error=failures[0])
            previous = (
                (self.job_dir / ckpt.LATEST).read_text().strip() if (self.job_dir / ckpt.LATEST).is_file() else None
            )
            raise CheckpointError(
                f"{tag_dir}: could not write the checkpoint ({failures[0]}). The previous checkpoint "
                f"({previous or 'none'}) is intact and the job stops here. Fix: free disk space, then rerun the "
                "same command to resume."
            )
        if self.rank == 0:
            ckpt.prune(self.job_dir, self.cfg.train.keep_checkpoints)
            self.logger.log("checkpoint", step, tag=tag)
        dist.barrier()

    def _gather_failures(self, failures: list[str]) -> list[str]:
        everyone = [None] * self.world
        dist.all_gather_object(everyone, failures)
        return [f for part in everyone for f in part]

    def resume(self) -> int:
        """Load the newest intact checkpoint of this job; returns the step to continue from (0 if none).

        Rank 0 verifies it and stages a view holding the listed files alone; every rank loads from that view
        with weights_only loading (dbscale/train/checkpoint.py), so no file planted in the job directory is read."""
        choice = [None]
        views = ExitStack()
        if self.rank == 0:
            try:
                ckpt.remove_stale_views(self.job_dir)
                info = ckpt.find_resumable(self.job_dir, self.run.run_id, self.block)
                if info is not None:
                    self._check_resumable(info)
                    view = views.enter_context(ckpt.verified_view(info))
                choice = [(info.tag, info.marker, str(view)) if info else None]
            except CheckpointError as e:
                choice = [("error", str(e), None)]
        dist.broadcast_object_list(choice, src=0)
        if choice[0] is None:
            return 0
        tag, marker, view = choice[0]
        if tag == "error":
            raise CheckpointError(marker)
        with views:
            try:
                with ckpt.weights_only_loads():
                    self.engine.load_checkpoint(view, tag=tag)
                failure = None
            except Exception as e:  # what DeepSpeed or torch's weights_only loader refuse
                failure = f"{type(e).__name__}: {str(e)[:300]}"
            failures = [f for f in self._gather_failures([failure] if failure else []) if f]
        if failures:
            raise CheckpointError(
                f"{self.job_dir / tag}: the checkpoint could not be loaded ({failures[0]}); nothing was changed. "
                f"Fix: move {tag} out of {self.job_dir} to resume from the one before it (or to start over)."
            )
        if self.rank == 0:
            ckpt.remove_unfinished(self.job_dir, marker["step"])
        return int(marker["step"])

    def _check_resumable(self, info: ckpt.CheckpointInfo) -> None:
        saved_world, saved_stage = info.marker["world_size"], info.marker["zero_stage"]
        fixes = []
        if saved_world != self.world:
            fixes.append(
                f"relaunch with {saved_world} process(es) in all (this job has {self.world}; DeepSpeed cannot "
                "re-shard a ZeRO checkpoint)"
            )
        if saved_stage != self.cfg.train.zero_stage:
            fixes.append(
                f"resume at ZeRO stage {saved_stage}: drop the --set train.zero_stage={self.cfg.train.zero_stage} "
                f"override (or pass --set train.zero_stage={saved_stage})"
            )
        if fixes:
            raise CheckpointError(
                f"{info.path}: saved with {saved_world} process(es) at ZeRO stage {saved_stage}; this job has "
                f"{self.world} at stage {self.cfg.train.zero_stage}. Nothing was loaded. Fix: "
                + "; and ".join(fixes)
                + "."
            )

    # ---------------------------------------------------------------------------------------------------
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
        self._val_windows = self.val_shards.fixed_windows(t.val_batches * t.micro_batch, self.window_len)
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle_signal)
        tokens_per_step = t.micro_batch * t.grad_accum * self.world * self.cfg.model.seq_len
        self.logger.log(
            "start",
            start,
            job=self.job,
            world_size=self.world,
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
            disable=self.rank != 0,
            mininterval=1.0,
            dynamic_ncols=True,
        )
        # fault-injection hooks for the tests: a real SIGKILL / SIGINT after a given step
        kill_after = int(os.environ.get("DBSCALE_TEST_KILL_AFTER_STEP", "-1"))
        interrupt_after = int(os.environ.get("DBSCALE_TEST_INTERRUPT_AFTER_STEP", "-1"))
        last_val: dict = {}
        nonfinite = 0
        step = start
        window_t0, window_steps = time.time(), 0
        self.engine.train()
        while step < t.steps:
            step_t0 = time.time()
            losses, ces = [], []
            for micro in range(t.grad_accum):
                self._step_for_recurrence = step * t.grad_accum + micro
                window, sigma, noise = self._batch(step, micro)
                loss, ce = self._loss(window, sigma, noise)
                if self._agree(not torch.isfinite(loss).item()):  # before backward: the weights stay as they are
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
                self.engine.backward(loss)
                self.engine.step()
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
            if step == kill_after:
                os.kill(os.getpid(), signal.SIGKILL)
            if step == interrupt_after:
                os.kill(os.getpid(), signal.SIGINT)  # delivered to _handle_signal; acted on after the next step
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
