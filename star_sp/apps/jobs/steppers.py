"""The optimizer step of a fine-tuning job, two ways with one interface:

- ``TorchStepper``: plain PyTorch. Each micro-batch: the rank's share backward; at the step: the
  gradients summed over the sequence-parallel group (``reduce_gradients``), averaged over the
  data-parallel group, clipped, then AdamW on float32 master weights (the model itself in bfloat16
  on CUDA; on float32 the masters are the parameters).
- ``DeepSpeedStepper``: a DeepSpeed engine (ZeRO stage 0-3 from ``configs/deepspeed/*.json``).

Both: ``micro_step(sample, boundary, inspect)`` runs one micro-batch (``inspect(grads)`` sees
every parameter's full gradient, by name, at the step's boundary before clipping and the update),
then ``stats()`` gives the step's gradient norm and learning rate; ``save(dir)`` / ``load(dir)``
write and read the optimizer state, ``save_model(dir)`` the model in the transformers layout.

The schedule (``lr_lambda``): linear warm-up over ``warmup_steps``, then a cosine from ``lr`` down to
``lr * min_lr_ratio`` at the last step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os

import torch

from ...distributed.guard import guarded_step
from ...errors import StarCollectiveError, StarInputError
from ...training.grads import guarded_backward, reduce_gradients


def lr_lambda(cfg):
    """The multiplier of ``cfg.lr`` for optimizer step ``s`` (0-based)."""
    warmup, total, floor = cfg.warmup_steps, cfg.steps, cfg.min_lr_ratio

    def factor(s: int) -> float:
        if s < warmup:
            return (s + 1) / warmup
        progress = min(1.0, (s - warmup) / max(1, total - warmup))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    return factor


def _named_trainable(module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n.removeprefix("model."), p) for n, p in module.named_parameters() if p.requires_grad]


class TorchStepper:
    def __init__(self, module, cfg, groups, dtype: torch.dtype):
        self.module, self.cfg, self.groups = module, cfg, groups
        named = _named_trainable(module)
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        if dtype == torch.float32:
            self.masters = self.params
        else:  # float32 masters from the float32 weights, then the model in its training dtype
            self.masters = [torch.nn.Parameter(p.detach().float().clone()) for p in self.params]
            module.to(dtype)
        self.holder = torch.nn.ParameterList(self.masters)  # reduce_gradients takes a module
        self.optimizer = torch.optim.AdamW(self.masters, lr=cfg.lr, betas=tuple(cfg.adam_betas), eps=cfg.adam_eps,
                                           weight_decay=cfg.weight_decay)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg))
        self._stats: dict = {}

    @property
    def separate_masters(self) -> bool:
        return self.masters is not self.params

    def micro_step(self, sample, *, boundary: bool, inspect=None) -> dict:
        share, info = self.module(sample)
        # the mean over the step's micro-batches: each backward adds share / accumulation
        guarded_backward(share / self.cfg.gradient_accumulation_steps, self.groups.sp)
        if self.separate_masters:
            for m, p in zip(self.masters, self.params):
                if p.grad is not None:
                    m.grad = p.grad.float() if m.grad is None else m.grad.add_(p.grad)
                    p.grad = None
        if boundary:
            self._step(inspect)
        return info

    def _step(self, inspect) -> None:
        self._reduce()
        if inspect is not None:
            inspect({n: m.grad.detach().clone() for n, m in zip(self.names, self.masters)})
        # every rank holds the same gradients now, so the same norm and the same update
        max_norm = self.cfg.max_grad_norm or float("inf")
        norm = torch.nn.utils.clip_grad_norm_(self.masters, max_norm)
        self._stats = {"grad_norm": float(norm), "lr": self.scheduler.get_last_lr()[0]}
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.separate_masters:
            with torch.no_grad():
                for m, p in zip(self.masters, self.params):
                    p.copy_(m)

    def _reduce(self) -> None:
        """Every master's gradient of the step, the same on every rank: the sum of the ranks' shares over
        the sequence-parallel group, then the mean over the data-parallel groups. A rank whose loss did not
        reach a parameter counts as zeros in both (``reduce_gradients``), so a parameter one group alone
        used gets that group's gradient / ``dp_size``; one that no rank's loss reached has no gradient
        after the sums on any rank, and gets zeros on every rank, as in one process (AdamW then treats it
        alike everywhere: weight decay, moments)."""
        timeout = self.cfg.collective_timeout_s
        reduce_gradients(self.holder, self.groups.sp, timeout_s=timeout)
        if self.groups.dp is not None:
            reduce_gradients(self.holder, self.groups.dp, timeout_s=timeout)
        for m in self.masters:
            if m.grad is None:
                m.grad = torch.zeros_like(m)
            elif self.groups.dp is not None:
                m.grad.div_(self.groups.layout.dp_size)

    def stats(self) -> dict:
        return self._stats

    def save(self, path: str) -> None:
        if self.groups.layout.rank == 0:
            torch.save({"masters": [m.detach().cpu() for m in self.masters], "optimizer": self.optimizer.state_dict(),
                        "scheduler": self.scheduler.state_dict()}, os.path.join(path, "optimizer.pt"))

    def load(self, path: str) -> None:
        state = torch.load(os.path.join(path, "optimizer.pt"), map_location=self.masters[0].device, weights_only=True)
        with torch.no_grad():
            for m, p, saved in zip(self.masters, self.params, state["masters"]):
                m.copy_(saved)
                if self.separate_masters:
                    p.copy_(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    def save_model(self, path: str, tokenizer) -> None:
        if self.groups.layout.rank == 0:
            self.module.model.save_pretrained(path)
            tokenizer.save_pretrained(path)


# Keys of a DeepSpeed config that the run config sets (one place for each setting).
OWNED_KEYS = {"optimizer": "lr, adam_betas, adam_eps, weight_decay", "scheduler": "warmup_steps, min_lr_ratio",
              "train_batch_size": "gradient_accumulation_steps", "train_micro_batch_size_per_gpu": "(one sample)",
              "gradient_accumulation_steps": "gradient_accumulation_steps", "gradient_clipping": "max_grad_norm",
              "bf16": "dtype", "fp16": "dtype"}


def deepspeed_config(path: str, cfg, dtype: torch.dtype) -> dict:
    """The DeepSpeed config of ``path`` (ZeRO and communication settings) completed from the run config."""
    try:
        with open(path) as f:
            ds = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise StarInputError(f"cannot read the DeepSpeed config {path}: {exc}") from None
    if not isinstance(ds, dict):
        raise StarInputError(f"the DeepSpeed config {path} must hold a JSON object")
    owned = [k for k in OWNED_KEYS if k in ds and ds[k] != "auto"]
    if owned:
        raise StarInputError(f"the DeepSpeed config {path} sets {', '.join(owned)}, which the run config sets ("
                             + "; ".join(f"{k}: {OWNED_KEYS[k]}" for k in owned)
                             + "); remove them or set them to \"auto\"")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if stage not in (0, 1, 2, 3):
        raise StarInputError(f"the DeepSpeed config {path} has ZeRO stage {stage!r}; use 0, 1, 2 or 3")
    ds = {k: v for k, v in ds.items() if k not in OWNED_KEYS}
    ds.update(train_micro_batch_size_per_gpu=1, gradient_accumulation_steps=cfg.gradient_accumulation_steps,
              gradient_clipping=cfg.max_grad_norm, bf16={"enabled": dtype == torch.bfloat16},
              optimizer={"type": "AdamW", "params": {
                  "lr": cfg.lr, "betas": list(cfg.adam_betas), "eps": cfg.adam_eps, "weight_decay": cfg.weight_decay,
                  # torch's AdamW: nothing to compile (DeepSpeed's own CPU and fused Adams are C++/CUDA
                  # extensions built on first use)
                  "torch_adam": True}})
    ds.setdefault("steps_per_print", 1 << 30)  # the job logs; DeepSpeed's own lines would repeat it
    return ds


@contextlib.contextmanager
def _job_step(step: str, groups):
    """One step of a training job, which a failure on any rank ends on every rank of the job.

    ``guarded_step`` records a rank's failure for the group it guards, and a rank blocked in a collective
    reads the records of the group whose step it is in: Star's steps over the sequence-parallel group,
    DeepSpeed's collectives (over every rank) in this step over the world. So this rank's own failure,
    wherever it was caught first, is recorded for the world and for each of its groups, and the ranks of
    every group name it (a Star step by the failed rank's rank in its group, this step by its world
    rank). An error every rank raises alike, or another rank's failure seen here, passes unchanged."""
    try:
        yield
    except StarCollectiveError as exc:
        # guard.py's error on the rank that raised ("rank R failed in step ..."), so far recorded for one group
        own = exc.failed_rank is not None and str(exc).startswith(f"rank {exc.failed_rank} failed in step ")
        if own and exc.__cause__ is not None:
            _record_everywhere(exc.step, groups, exc.__cause__)
        raise
    except Exception as exc:  # recorded, then raised as the world's guard raises it
        if getattr(exc, "on_every_rank", False):
            raise
        told = _record_everywhere(step, groups, exc)
        if told is exc:
            raise
        raise told from exc


def _record_everywhere(step: str, groups, exc: BaseException) -> BaseException:
    """Record ``exc``, this rank's failure in ``step``, for the world and each of this rank's groups, as
    ``guarded_step`` does (unless another rank of that group failed first); returns the error the world's
    guard raises for it (``exc`` itself in one process)."""
    told = []
    for group in (groups.world, groups.sp, groups.dp):
        if group is None:
            continue
        try:
            with guarded_step(step, group):
                raise exc
        except Exception as error:  # noqa: BLE001 - the guard's verdict
            told.append(error)
    return told[0] if told else exc


class DeepSpeedStepper:
    """A DeepSpeed engine around the ``TrainModule`` (``ds_config`` from ``deepspeed_config``).

    Its data-parallel world is every rank, ``W = sp_size * dp_size``, and it averages gradients over
    all of them; so each rank backpropagates its share times ``sp_size``::

        (1 / W) * sum over ranks of (sp_size * g_rank) = (1 / dp_size) * sum over DP groups of
                                                         (the group's sum of its ranks' g_rank)

    the mean over data-parallel groups of each sample's exact gradient (a sequence-parallel group's
    sum, ``star_train_loss``'s contract). ZeRO partitions optimizer states (1), gradients (2) and
    parameters (3) over all ``W`` ranks. Stage 3 needs every rank to run the same modules' forward and
    backward in the same order (it gathers a module's parameters in both): in a Star group every rank
    runs every module (an idle one over a stand-in row), and what a rank computes but does not use joins
    its output at weight 0 (``runtime/passes.py: _same_backward``)."""

    def __init__(self, module, cfg, groups, ds_config: dict):
        import deepspeed

        self.module, self.cfg, self.groups = module, cfg, groups
        self.stage = ds_config.get("zero_optimization", {}).get("stage", 0)
        _skip_cpu_shared_memory_kernel()
        params = [p for p in module.parameters() if p.requires_grad]
        schedule = lr_lambda(cfg)
        self.engine, _, _, self.scheduler = deepspeed.initialize(
            model=module, model_parameters=params, config=ds_config, dist_init_required=False,
            lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
        self.names = [n for n, _ in _named_trainable(module)]
        self._stats: dict = {}

    def micro_step(self, sample, *, boundary: bool, inspect=None) -> dict:
        # DeepSpeed's collectives (ZeRO's gathers and reductions, the step's) span every rank, not the
        # sequence-parallel group alone: each part is one step of the whole job (_job_step)
        with _job_step("forward", self.groups):
            share, info = self.engine(sample)
        with _job_step("backward", self.groups):
            self.engine.backward(share * self.groups.layout.sp_size)  # see the class docstring
        with _job_step("optimizer step", self.groups):
            if boundary:
                from deepspeed.utils import safe_get_full_grad

                if inspect is not None:
                    inspect({n: safe_get_full_grad(p).detach().float().clone()
                             for n, p in zip(self.names, (p for p in self.module.parameters() if p.requires_grad))})
                lr = self.engine.get_lr()[0]
            self.engine.step()  # DeepSpeed counts micro-batches here and updates at the boundary only
            if boundary:
                norm = self.engine.get_global_grad_norm()
                self._stats = {"grad_norm": None if norm is None else float(norm), "lr": lr}
        return info

    def stats(self) -> dict:
        return self._stats

    def save(self, path: str) -> None:
        self.engine.save_checkpoint(path, tag="deepspeed", save_latest=False)

    def load(self, path: str) -> None:
        loaded, _ = self.engine.load_checkpoint(path, tag="deepspeed", load_optimizer_states=True,
                                                load_lr_scheduler_states=True)
        if loaded is None:
            raise StarInputError(f"DeepSpeed found no state in {path}/deepspeed; delete the checkpoint folder to "
                                 "start from the one before it")

    def save_model(self, path: str, tokenizer) -> None:
        rank = self.groups.layout.rank
        model = self.module.model
        if self.stage == 3:  # parameters are partitioned: gather each in turn to rank 0
            import deepspeed

            state = {}
            for name, p in model.named_parameters():
                with deepspeed.zero.GatheredParameters([p], modifier_rank=None):
                    if rank == 0:
                        state[name] = p.detach().cpu().clone()
            if rank == 0:
                state.update({n: b.detach().cpu() for n, b in model.named_buffers()
                              if n.split(".")[-1] not in _non_persistent(model, n)})
                model.save_pretrained(path, state_dict=state)
        elif rank == 0:
            model.save_pretrained(path)
        if rank == 0:
            tokenizer.save_pretrained(path)


def _non_persistent(model, name: str) -> set:
    owner = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return getattr(owner, "_non_persistent_buffers_set", set())


def _skip_cpu_shared_memory_kernel() -> None:
    """On CPU, DeepSpeed's communication layer compiles a shared-memory all-reduce kernel when it starts
    (about a minute the first time on a machine), used only by its inference all-reduce; training
    reduces through torch.distributed (gloo). Marking the kernel unavailable in DeepSpeed's table of
    compatible ops (a dict it keeps and reads for this decision) makes it use gloo without compiling."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
