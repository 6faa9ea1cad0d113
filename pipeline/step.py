"""The training step's recipe, shared by `kd teacher` and `kd distill`: mixed precision, gradient clipping, an
exponential moving average (EMA) of the weights, and running totals kept on the device.

Precision (`teacher.amp`, `distill.amp`): `auto` is bfloat16 autocast on a CUDA device that supports it, off
elsewhere (the CPU); `off` | `bfloat16` | `float16` as given. float16 scales the loss with a `GradScaler` (its
state goes into the resume checkpoint); bfloat16 needs none. Only the model's forward runs under autocast: the
loss is computed in float32 from the upcast logits (`pipeline.loss.kd_loss`), so a large T stays accurate, and a
teacher run live is never inside the student's autocast.

The EMA (`distill.ema`, `teacher.ema`: a decay d, or null): after every optimiser step,
W_ema <- d W_ema + (1 - d) W, for parameters and buffers (BatchNorm statistics) alike, as timm's ModelEmaV3 and
torch.optim.swa_utils.AveragedModel(use_buffers=True) do (this is that class). The EMA's weights are validated
every epoch and saved as the model.

Running totals: the epoch's loss sum and correct count accumulate on the device, so a step never waits for the
device. A non-finite loss is still caught: the running loss is checked every `FINITE_EVERY` steps and at the end
of every epoch, so a run never trains more than FINITE_EVERY - 1 steps past a NaN or infinite loss.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from pipeline import KDError

FINITE_EVERY = 32  # steps between checks of the running loss for NaN/inf (one host synchronisation each)


class DivergedError(KDError):
    """Training diverged: the loss became NaN or infinite."""


def resolve_train_amp(amp: str, device: torch.device) -> str:
    """`teacher.amp` / `distill.amp` as it runs on `device`: auto -> bfloat16 on CUDA where supported, else off."""
    if amp == "auto":
        return "bfloat16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "off"
    return amp


class Step:
    """One optimiser step of `model` with the run's precision, clipping and EMA.

    `forward(x)` runs `model` under the run's autocast; `update(loss)` backpropagates `loss` (float32), clips the
    gradient's global norm to `clip_grad_norm` (null: no clipping; under float16 after unscaling, as timm does),
    steps the optimiser (through the GradScaler under float16) and updates the EMA of `weights` (the model's
    unwrapped module). `state()` / `load(state)`: the scaler's and the EMA's state for the resume checkpoint.
    """

    def __init__(self, model: nn.Module, weights: nn.Module, optimizer, amp: str, device: torch.device,
                 clip_grad_norm: float | None = None, ema: float | None = None, channels_last: bool = False):
        self.model, self.weights, self.optimizer, self.device = model, weights, optimizer, device
        self.precision = resolve_train_amp(amp, device)
        self.dtype = {"bfloat16": torch.bfloat16, "float16": torch.float16}.get(self.precision)
        self.scaler = torch.amp.GradScaler(device.type) if self.precision == "float16" else None
        self.clip_grad_norm, self.channels_last = clip_grad_norm, channels_last
        self.ema = None
        if ema is not None:
            from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

            self.ema = AveragedModel(weights, multi_avg_fn=get_ema_multi_avg_fn(ema), use_buffers=True)

    def autocast(self):
        """The run's autocast context (none when precision is off, so float32 runs are today's, bit for bit)."""
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """`x` on the device (non-blocking from pinned memory), channels-last when the run says so."""
        x = x.to(self.device, non_blocking=True)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with self.autocast():
            return self.model(self.inputs(x))

    def update(self, loss: torch.Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        params = self.weights.parameters
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            if self.clip_grad_norm is not None:
                self.scaler.unscale_(self.optimizer)
                nn.utils.clip_grad_norm_(params(), self.clip_grad_norm)
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            if self.clip_grad_norm is not None:
                nn.utils.clip_grad_norm_(params(), self.clip_grad_norm)
            self.optimizer.step()
        if self.ema is not None:
            self.ema.update_parameters(self.weights)

    @property
    def result(self) -> nn.Module:
        """The model to validate and save: the EMA's copy when there is one, else the trained weights."""
        return self.ema.module if self.ema is not None else self.weights

    def state(self) -> dict:
        state = {}
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        return state

    def load(self, state: dict) -> None:
        if self.scaler is not None:
            self.scaler.load_state_dict(state["scaler"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])


class Totals:
    """An epoch's running loss sum and correct count on the device (no host synchronisation per step), with the
    finite check every FINITE_EVERY steps. `what`, `epoch` and `lr` name the run in a DivergedError."""

    def __init__(self, device: torch.device, what: str, epoch: int, lr: float, every: int = FINITE_EVERY):
        dtype = torch.float32 if device.type == "mps" else torch.float64  # MPS has no float64
        self.loss = torch.zeros((), dtype=dtype, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen, self.steps, self.every = 0, 0, every
        self.what, self.epoch, self.lr = what, epoch, lr

    def add(self, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor) -> None:
        """Count one step: `loss` the batch mean, `y` class indices on the logits' device."""
        self.loss += loss.detach().to(self.loss.dtype) * len(y)
        self.correct += (logits.argmax(1) == y).sum()
        self.seen += len(y)
        self.steps += 1
        if self.steps % self.every == 0:
            self.check()

    def check(self) -> None:
        """Raise DivergedError if the running loss is NaN or infinite (one host synchronisation)."""
        value = self.loss.item()
        if not math.isfinite(value):
            raise DivergedError(f"{self.what} diverged: the loss became {value} in epoch {self.epoch}; lower the "
                                f"learning rate (now {self.lr:g}) or, when distilling, kd_weight or temperature")

    def values(self) -> tuple[float, float, float]:
        """(loss sum, correct, seen), checked finite."""
        self.check()
        return self.loss.item(), float(self.correct.item()), float(self.seen)
