"""The training loop for the course's Part B: a one-step denoiser, and time (and class) conditioned DDPM.

Speed comes from keeping everything on the device: the whole data set sits there as uint8, batches are
random index gathers, t / noise / condition dropout are drawn on the device, losses are summed there and
read back only every `log_every` steps; bf16 autocast on CUDA. Randomness is a pure function of (seed, step)
and (seed, epoch), so a resumed run draws exactly what the killed one would have drawn.

Under torchrun (mirage.parallel) each of N ranks trains a DistributedDataParallel copy on its own contiguous
share (batch-size / N images) of every global batch of the epoch's permutation. Each rank draws the random
numbers of the whole global batch and keeps its rows, so N ranks take the same steps as one process at the
same --batch-size (up to the order of float sums). Rank 0 alone reads and writes the run folder.
"""
from __future__ import annotations

import math
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.parallel import DistributedDataParallel

from mirage import parallel
from mirage.backends.classes import CLASS_NAMES, canonical
from mirage.backends.small import SmallUNet
from mirage.backends.unet import UNet, model_config
from mirage.engine.sample import Sampling
from mirage.engine.schedule import Schedule
from mirage.engine.tasks import sample
from mirage.errors import MirageError, UsageError
from mirage.train import runs
from mirage.train.data import load_dataset

DENOISER_SIGMAS = (0.0, 0.2, 0.4, 0.5, 0.6, 0.8, 1.0)
GRAPH_WARMUP = 3  # eager steps before the capture (cuDNN's algorithm search, torch.compile)


@dataclass
class TrainConfig:
    kind: str  # "denoiser" | "ddpm"
    data: str = "fashion"
    root: str | None = None
    classes: bool = False
    epochs: int = 10
    batch_size: int = 256
    lr: float = 2e-3
    lr_schedule: str = "cosine"  # cosine (with warmup) | exponential (the course: x0.1 over the run)
    warmup: int = 100
    ema: float = 0.999
    p_uncond: float = 0.1
    sigma: float = 0.5  # the one-step denoiser's training noise level
    seed: int = 0
    subset: int = 0  # train on the first N images only (0 = all)
    sample_steps: int = 30
    guidance: float = 3.0
    every: int = 1  # epochs between sample grids and checkpoints (the last epoch always has both)
    checkpoint_every: float = 120.0  # seconds between checkpoints within an epoch
    log_every: int = 25
    compile: bool = False
    graph: bool = True  # on CUDA, replay the training step from a CUDA graph after GRAPH_WARMUP eager steps
    channels_last: bool = False  # memory layout of the convolutions' activations (CUDA)
    model: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


def make_model_config(cfg: TrainConfig, preset: str = "default", schedule: str = "cosine", T: int = 1000,
                      **overrides) -> dict:
    """The UNet config plus what a sampler needs: schedule (diffusers' keys), data set, class names."""
    data = canonical(cfg.data)
    ddpm = cfg.kind == "ddpm"
    model = model_config(preset, num_classes=10 if cfg.classes else 0, time_cond=ddpm,
                         target="eps" if ddpm else "x0", **overrides)
    if ddpm:
        model["schedule"] = {"num_train_timesteps": T, "clip_sample": True,
                             "beta_schedule": {"cosine": "squaredcos_cap_v2", "linear": "linear"}[schedule]}
    model.update(data=data, class_names=CLASS_NAMES[data] if cfg.classes else [])
    return model


# ---- one step of each objective ---------------------------------------------------------------------
# Each objective is split in two: its random draws, made eagerly from a generator seeded by the step, and
# its loss, a pure function of the draws: the part that a CUDA graph replays.
def ddpm_draws(x0: Tensor, labels: Tensor | None, T: int, p_uncond: float, gen: torch.Generator,
               part: tuple[int, int] = (0, 1)):
    """(t uniform in [0, T), eps, labels with the class dropped to null (-1) with probability p_uncond).
    part = (rank, ranks): x0 is that share of a global batch; the draws are the global batch's, cut to it."""
    n = x0.shape[0]
    rows = _rows(n, part)
    t = torch.randint(0, T, (n * part[1],), device=x0.device, generator=gen)[rows]
    eps = torch.randn((n * part[1], *x0.shape[1:]), device=x0.device, generator=gen)[rows]
    if labels is not None:
        drop = torch.rand(n * part[1], device=x0.device, generator=gen)[rows] < p_uncond
        labels = torch.where(drop, torch.full_like(labels, -1), labels)
    return t, eps, labels


def _rows(n: int, part: tuple[int, int]) -> slice:
    return slice(part[0] * n, (part[0] + 1) * n)


def ddpm_loss(net, x0: Tensor, labels: Tensor | None, t: Tensor, eps: Tensor, alphas_cumprod: Tensor) -> Tensor:
    """||eps - eps_theta(x_t, t, c)||^2."""
    a = alphas_cumprod[t].view(-1, 1, 1, 1)
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    with _autocast(x0.device):
        pred = net(x_t, t.float() / len(alphas_cumprod), labels)
    return F.mse_loss(pred.float(), eps)


def denoiser_loss(net, x: Tensor, eps: Tensor, sigma: float) -> Tensor:
    """The course's one-step denoiser: ||D(x + sigma eps) - x||^2, images in [0, 1]."""
    with _autocast(x.device):
        pred = net(x + sigma * eps)
    return F.mse_loss(pred.float(), x)


def _autocast(device: torch.device):
    # no cast cache: it would hold bf16 weight copies made during a graph capture
    return torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda", cache_enabled=False)


def learning_rate(cfg: TrainConfig, step: int, total: int) -> float:
    if cfg.lr_schedule == "exponential":
        return cfg.lr * 0.1 ** (step / max(total, 1))
    warm = min(1.0, (step + 1) / max(cfg.warmup, 1))
    return cfg.lr * warm * 0.5 * (1 + math.cos(math.pi * min(step / max(total, 1), 1.0)))


# ---- the run ------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: TrainConfig, run: Path, device: torch.device, quiet: bool = False,
                 ctx: parallel.Context | None = None):
        self.ctx = ctx = ctx or parallel.Context(device=device)
        self.cfg, self.run, self.device, self.quiet = cfg, run, ctx.device if ctx.active else device, quiet
        device = self.device
        parallel.check_batch(cfg.batch_size, ctx.world)
        self.rank_batch = cfg.batch_size // ctx.world  # this rank's share of each global batch
        images, labels = load_dataset(cfg.data, "train", cfg.root)
        if cfg.subset < 0 or cfg.subset > len(images):
            raise UsageError(f"--subset must be from 1 to {len(images)} (the {cfg.data} training images), "
                             f"got {cfg.subset}")
        if cfg.subset:
            images, labels = images[:cfg.subset], labels[:cfg.subset]
        if len(images) < cfg.batch_size:
            raise UsageError(f"--batch-size {cfg.batch_size} is larger than the data ({len(images)} images)")
        self.images = images[:, None].to(device)  # uint8 on the device: 47 MB for all of Fashion-MNIST
        self.labels = labels.to(device)
        self.test = load_dataset(cfg.data, "test", cfg.root)[0][:8, None]
        self.steps_per_epoch = len(images) // cfg.batch_size
        self.total = self.steps_per_epoch * cfg.epochs
        torch.manual_seed(cfg.seed)  # the initial weights
        self.net = UNet(cfg.model).to(device)
        self.ema = UNet(cfg.model).to(device).requires_grad_(False)
        self.ema.load_state_dict(self.net.state_dict())
        if cfg.channels_last:  # in place: the optimizer below sees the same parameters either way
            self.net.to(memory_format=torch.channels_last)
            self.ema.to(memory_format=torch.channels_last)
        self.batch_norm_per_rank = ctx.active and cfg.model.get("norm") == "batch" and device.type != "cuda"
        if ctx.active and cfg.model.get("norm") == "batch" and device.type == "cuda":
            # the course UNet's BatchNorm then sees the global batch's statistics (same state_dict keys)
            self.net = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.net)
        # learning rate and EMA rate are tensors that each step refills, so a captured step reads them anew
        self.lr = torch.tensor(cfg.lr, device=device)
        self.ema_rate = torch.zeros((), device=device)
        cuda = device.type == "cuda"
        self.opt = torch.optim.Adam(self.net.parameters(), lr=self.lr, fused=cuda or None, capturable=cuda)
        # DDP averages the gradients over the ranks in backward; it starts from rank 0's weights
        self.ddp = DistributedDataParallel(self.net, device_ids=[device.index] if cuda else None) \
            if ctx.active else None
        self.forward = torch.compile(self.ddp or self.net) if cfg.compile else (self.ddp or self.net)
        # CUDA graphs: one process only (capturing DDP's all-reduce needs NCCL's graph mode, not set up here)
        self.use_graph = cfg.graph and cuda and not ctx.active
        if cfg.kind == "ddpm":
            self.alphas_cumprod = Schedule.from_config(cfg.model["schedule"]).alphas_cumprod.to(device)
        self.gen = torch.Generator(device)
        self.step = 0
        self._perm, self._perm_epoch = None, None  # this epoch's order of the data
        self.graph = None  # the captured update, once warm (cfg.graph, CUDA only)
        self.eager_steps = 0
        self.train_s = 0.0  # seconds of training before this session (a resumed run's earlier sessions)
        self.log_carry = (0.0, 0)  # (loss sum, steps) of a log interval a checkpoint cut, to finish after it

    # -- state -----------------------------------------------------------------------------------------
    def resume(self) -> bool:
        # rank 0 reads the checkpoint (verified) and hands it to the others: one shared folder is not needed
        state = self.ctx.broadcast_object(runs.load_state(self.run) if self.ctx.main else None)
        if state is None:
            return False
        try:
            self.net.load_state_dict(state["raw"])
            self.ema.load_state_dict(state["ema"])
        except RuntimeError:
            raise MirageError(f"{self.run / runs.STATE} does not fit the model in its config.json") from None
        runs.restore_optimizer(self.opt, state["optim"], state["optim_meta"])
        for g in self.opt.param_groups:
            g["lr"] = self.lr  # the checkpoint holds it as a number
        self.step = state["step"]
        if self.ctx.main:
            rows = runs.read_metrics(self.run, upto_step=self.step)
            runs.rewrite_metrics(self.run, rows)
            if state.get("train_s") is None:  # a checkpoint from before train_s was recorded in it
                state["train_s"] = max((r["train_s"] for r in rows if "train_s" in r), default=0.0)
        self.train_s = self.ctx.broadcast_object(state.get("train_s") or 0.0)
        self.log_carry = state.get("log_carry") or (0.0, 0)
        return True

    def checkpoint(self, train_s: float | None = None, log_carry: tuple[Tensor, int] | None = None) -> bool:
        """Rank 0 writes the state of this step (the EMA averaged over the ranks first); False, and nothing
        written, if the weights hold NaN or inf: the last checkpoint stays the last good one. `log_carry`: the
        (loss sum, steps) of the log interval under way, so that a resumed run logs what this one would."""
        self.ctx.average_(list(self.ema.parameters()) + list(self.ema.buffers()))
        carry = (self.ctx.mean(log_carry[0]).item(), log_carry[1]) if log_carry and log_carry[1] else None
        weights = list(self.net.parameters()) + list(self.ema.parameters())
        finite = self.ctx.all_true(bool(torch.stack([torch.isfinite(w).all() for w in weights]).all()))
        if not finite:
            return False
        if self.ctx.main:
            optim, meta = runs.optimizer_tensors(self.opt)
            runs.save_checkpoint(self.run, self.cfg.model, self.step, self.step // self.steps_per_epoch,
                                 self.net.state_dict(), self.ema.state_dict(), optim, meta, train_s, carry)
        return True

    # -- the loop --------------------------------------------------------------------------------------
    def batch(self, epoch: int, index: int) -> tuple[Tensor, Tensor]:
        if self._perm_epoch != epoch:
            perm_gen = torch.Generator(self.device).manual_seed(self.cfg.seed * 100_003 + epoch)
            self._perm = torch.randperm(len(self.images), device=self.device, generator=perm_gen)
            self._perm_epoch = epoch
        start = index * self.cfg.batch_size + self.ctx.rank * self.rank_batch  # this rank's share
        idx = self._perm[start:start + self.rank_batch]
        return self.images[idx], self.labels[idx]

    def train_step(self, epoch: int, index: int) -> Tensor:
        cfg = self.cfg
        self.gen.manual_seed(cfg.seed * 1_000_003 + self.step)
        inputs = self.draws(*self.batch(epoch, index))
        self.lr.fill_(learning_rate(cfg, self.step, self.total))
        self.ema_rate.fill_(1 - min(cfg.ema, (1 + self.step) / (10 + self.step)))  # follow closely at first
        if self.graph is not None:
            for static, x in zip(self.static_inputs, inputs):
                if x is not None:  # None: no labels (an unconditional model)
                    static.copy_(x)
            self.graph.replay()
            loss = self.static_loss
        elif not self.use_graph:
            loss = self.update(*inputs)
        elif self.eager_steps < GRAPH_WARMUP:
            loss = self._warm(inputs)
            self.eager_steps += 1
        else:
            loss = self._capture(inputs)
        self.step += 1
        return loss.detach()

    def draws(self, images: Tensor, labels: Tensor) -> tuple:
        """The update's inputs for one batch: the images in the objective's range and its random draws."""
        part = (self.ctx.rank, self.ctx.world)
        if self.cfg.kind == "denoiser":
            x = images.float() / 255
            eps = torch.randn((len(x) * part[1], *x.shape[1:]), device=x.device, generator=self.gen)
            return x, eps[_rows(len(x), part)]
        x = images.float() / 127.5 - 1
        t, eps, labels = ddpm_draws(x, labels if self.cfg.classes else None, len(self.alphas_cumprod),
                                    self.cfg.p_uncond, self.gen, part)
        return x, t, eps, labels

    def update(self, *inputs) -> Tensor:
        """One optimizer step from `draws`' output: loss, gradients, Adam, EMA. No host sync, no randomness."""
        if self.cfg.kind == "denoiser":
            loss = denoiser_loss(self.forward, *inputs, self.cfg.sigma)
        else:
            x, t, eps, labels = inputs
            loss = ddpm_loss(self.forward, x, labels, t, eps, self.alphas_cumprod)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        with torch.no_grad():
            # ema += rate * (net - ema), spelled out: lerp would read the rate tensor back to the host
            ema, net = list(self.ema.parameters()), list(self.net.parameters())
            delta = torch._foreach_sub(net, ema)
            torch._foreach_mul_(delta, self.ema_rate)
            torch._foreach_add_(ema, delta)
            for b_ema, b in zip(self.ema.buffers(), self.net.buffers()):
                b_ema.copy_(b)
        return loss

    # -- CUDA graph: the UNet is small, so an eager step is mostly kernel launches ------------------------
    def _warm(self, inputs: tuple) -> Tensor:
        """An eager step on a side stream, as graph capture wants its first steps (lazy initializations)."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            loss = self.update(*inputs)
        torch.cuda.current_stream(self.device).wait_stream(side)
        return loss

    def _capture(self, inputs: tuple) -> Tensor:
        """Record `update` on static copies of its inputs, then run it: every later step is one replay."""
        self.static_inputs = [None if x is None else x.clone() for x in inputs]
        self.opt.zero_grad(set_to_none=True)  # the gradients are then allocated in the graph's pool
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.static_loss = self.update(*self.static_inputs)
        graph.replay()  # capturing records the step without running it
        self.graph = graph
        return self.static_loss

    def fit(self) -> int:
        from tqdm import tqdm

        cfg, ctx = self.cfg, self.ctx
        bar = tqdm(total=self.total, initial=self.step, unit="step", disable=self.quiet or not ctx.main,
                   dynamic_ncols=True, file=sys.stderr)
        good_step, last_ckpt = self.step, time.monotonic()
        loss_sum, n_sum, t_log, step_log = torch.zeros((), device=self.device), 0, time.perf_counter(), self.step
        loss_sum += self.log_carry[0]  # a resumed interval logs the steps before the checkpoint too
        n_sum = self.log_carry[1]
        train_time = self.train_s  # the whole run's, earlier sessions included
        while self.step < self.total:
            epoch, index = divmod(self.step, self.steps_per_epoch)
            loss_sum += self.train_step(epoch, index)
            n_sum += 1
            end_of_epoch = self.step % self.steps_per_epoch == 0
            if n_sum == cfg.log_every or end_of_epoch:
                loss = ctx.mean(loss_sum / n_sum).item()  # the one sync per log interval; the ranks' mean
                now = time.perf_counter()
                train_time += now - t_log
                rate = (self.step - step_log) * cfg.batch_size / max(now - t_log, 1e-9)
                if not math.isfinite(loss):
                    bar.close()
                    return self._diverged(f"loss became {loss}", good_step)
                if ctx.main:
                    runs.append_metrics(self.run, {"step": self.step, "loss": loss, "img_per_s": round(rate),
                                                   "lr": learning_rate(cfg, self.step - 1, self.total)})
                bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{rate:,.0f}", refresh=False)
                bar.update(self.step - bar.n)
                loss_sum, n_sum = torch.zeros((), device=self.device), 0
                if end_of_epoch and ctx.main:
                    runs.append_metrics(self.run, {"step": self.step, "epoch": epoch + 1, "epoch_end": True,
                                                   "loss": loss, "train_s": round(train_time, 2)})
                t_log, step_log = now, self.step
            outputs = end_of_epoch and ((epoch + 1) % cfg.every == 0 or self.step == self.total)
            # checked at every step, on rank 0's clock: --checkpoint-every is kept to the step
            if ctx.decide(time.monotonic() - last_ckpt > cfg.checkpoint_every) or outputs:
                paused = time.perf_counter()
                if not self.checkpoint(train_time + paused - t_log, (loss_sum, n_sum)):
                    bar.close()
                    return self._diverged("the weights became NaN or inf", good_step)
                good_step, last_ckpt = self.step, time.monotonic()
                if outputs and ctx.main:
                    self.epoch_outputs(epoch + 1)
                t_log += time.perf_counter() - paused  # checkpoints and sample grids are not training time
        bar.close()
        if ctx.main:
            self.finish()
        return 0

    def _diverged(self, what: str, good_step: int) -> int:
        if self.ctx.main:
            kept = (f"the last good checkpoint (step {good_step}) is kept in {self.run}" if good_step
                    else "no checkpoint had been written yet; try a lower --lr")
            print(f"mirage train: {what} at step {self.step}; stopped: {kept}", file=sys.stderr)
        return 1

    # -- what each epoch leaves behind ------------------------------------------------------------
    def epoch_outputs(self, epoch: int) -> None:
        name = self.run / "samples" / f"epoch_{epoch:03d}.png"
        runs.save_picture(name, self.sample_grid())
        runs.save_gif(self.run / runs.GIF, sorted((self.run / "samples").glob("epoch_*.png")))
        runs.save_picture(self.run / runs.LOSS_PNG, runs.loss_curve(runs.read_metrics(self.run)))

    @torch.no_grad()
    def sample_grid(self):
        if self.cfg.kind == "denoiser":
            return runs.grid(self.denoise_rows([self.cfg.sigma]), rows=3)

        model = SmallUNet(self.ema, self.cfg.model, name=self.run.name)
        names = self.cfg.model["class_names"]
        rows = 4
        prompts = [n for _ in range(rows) for n in names] if names else [""] * 40
        sampling = Sampling.spaced(model.schedule, self.cfg.sample_steps, guidance=self.cfg.guidance if names else 1.0)
        images = sample(model, prompts, list(range(len(prompts))), sampling)
        self.ema.eval()  # sampling put it in eval mode; it is never trained, so leave it so
        return runs.grid(images, rows=rows)

    @torch.no_grad()
    def denoise_rows(self, sigmas) -> Tensor:
        """Rows: the clean test images, then for each sigma the noisy ones and what the denoiser made of them."""
        x = self.test.to(self.device).float() / 255
        gen = torch.Generator(self.device).manual_seed(self.cfg.seed)
        rows = [x]
        self.ema.eval()
        for s in sigmas:
            z = x + s * torch.randn(x.shape, device=self.device, generator=gen)
            rows += [z.clamp(0, 1), self.ema(z).clamp(0, 1)]
        return torch.cat(rows) * 2 - 1

    def finish(self) -> None:
        if self.cfg.kind == "denoiser":
            runs.save_picture(self.run / "sigmas.png", runs.grid(self.denoise_rows(DENOISER_SIGMAS),
                                                                 rows=1 + 2 * len(DENOISER_SIGMAS)))


def train(out: Path, device: torch.device, cfg: TrainConfig | None = None, kind: str | None = None,
          epochs: int | None = None, quiet: bool = False, ctx: parallel.Context | None = None) -> int:
    """Start a run in `out` from `cfg`, or (cfg None) continue the one there from its last checkpoint, as a
    `kind` run, optionally for a different number of `epochs`. `ctx`: this rank's place under torchrun (none:
    one process). The run folder is claimed (RUN/train.lock) for as long as the training lasts."""
    ctx = ctx or parallel.Context(device=device)
    resume = cfg is None
    lock = None
    try:
        if resume:
            config = None
            if ctx.main:
                config = runs.read_config(out)
                lock = runs.claim(out)  # a second `--resume` of this folder stops here
                runs.remove_partials(out)  # what a kill during a write left
            cfg = TrainConfig.from_dict(ctx.broadcast_object(config))
            if kind is not None and cfg.kind != kind:
                raise UsageError(f"{out} is a {cfg.kind} run: resume it with `mirage train {cfg.kind}`")
            cfg.epochs = epochs or cfg.epochs
            trainer = Trainer(cfg, out, device, quiet, ctx)
            if not trainer.resume():
                raise UsageError(f"nothing to resume in {out}: it has no checkpoint ({runs.STATE}) yet")
        else:
            trainer = Trainer(cfg, out, device, quiet, ctx)  # loads the data first: a missing data set leaves no folder
            if ctx.main:
                lock = runs.new_run(out, asdict(cfg))
        if not quiet and ctx.main:
            n = sum(p.numel() for p in trainer.net.parameters())
            where = (f"on {ctx.world} ranks ({ctx.backend}, {trainer.device.type}), {trainer.rank_batch} images a "
                     f"step each" if ctx.active else f"on {trainer.device}")
            bn = ("; BatchNorm statistics are each rank's own (SyncBatchNorm needs CUDA)"
                  if trainer.batch_norm_per_rank else "")
            print(f"mirage train {cfg.kind}: {cfg.data}, {len(trainer.images)} images, {n / 1e6:.2f}M parameters, "
                  f"{trainer.total} steps {where}" + (f", from step {trainer.step}" if resume else "") + bn,
                  file=sys.stderr)
        return trainer.fit()
    finally:
        if lock is not None:
            lock.release()
