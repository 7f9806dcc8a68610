"""Engine: the one training/inference engine interface trainers use (DeepSpeed inside).

Trainers call forward/backward/step/save/load here and never `deepspeed.*` directly. The
DeepSpeed config is built from our dataclasses by `ds_config`; the learning-rate schedule is
ours (parallel.schedule) passed to DeepSpeed as a torch LambdaLR.

Typical loop, one call per micro-batch:
    loss = loss_fn(engine(x), y); engine.backward(loss); info = engine.step()
`info` is {} between accumulation boundaries and {step, lr, grad_norm} after an optimizer step.

The optimizer is torch's AdamW built here (fused: one kernel over all tensors, where torch
has it for the device; 4-5x faster than the per-tensor loop on CPU) and handed to DeepSpeed
as a client optimizer; the config's "optimizer" entry describes it. At world size 1 under
ZeRO-0 the gradient all-reduce (a flatten/copy of every gradient) is skipped.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from trellis.parallel import dist
from trellis.parallel.batch import BatchPlan
from trellis.parallel.config import OptimConfig, ParallelConfig
from trellis.parallel.precision import model_width, resolve_precision
from trellis.parallel.schedule import make_lambda_lr

log = logging.getLogger(__name__)

# DeepSpeed writes an engine checkpoint into <dir>/<tag>/; one fixed tag per directory because
# step numbering lives in our checkpoint directory names (parallel.checkpoint).
TAG = "engine"


# DeepSpeed trains bf16 at ZeRO stage 0 with its fp16 "unfused" optimizer: gradients
# accumulate across micro-batches in bf16, and each step checks every gradient for inf/nan
# and copies every parameter one by one (a nanoGPT-sized engine step: 17.6 ms vs 6.9 in fp32).
# Stage 1 with fp32 gradient accumulation runs its BF16_Optimizer instead (flat fp32 buffers;
# the same step 5.7 ms), so a trainable bf16 engine asked for stage 0 runs stage 1: at world
# size 1 that partitions nothing; on more ranks each keeps 1/world of the fp32 masters and
# Adam state, which only saves memory.


def ds_config(optim: OptimConfig | None, par: ParallelConfig, plan: BatchPlan,
              trainable: bool = True) -> dict[str, Any]:
    """DeepSpeed config dict from our configs. Pure: no DeepSpeed import, testable."""
    on_gpu = torch.cuda.is_available()
    precision = resolve_precision(par.precision)
    stage = par.engine_stage(trainable, precision)
    zero: dict[str, Any] = {"stage": stage, "reduce_bucket_size": par.bucket_elements,
                            "allgather_bucket_size": par.bucket_elements}
    if stage == 3:
        zero["stage3_param_persistence_threshold"] = par.zero3_persistence_threshold
        zero["stage3_prefetch_bucket_size"] = par.bucket_elements
    if stage >= 1 and par.offload_optimizer and trainable:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if stage == 3 and par.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": plan.micro_batch,
        "gradient_accumulation_steps": plan.grad_accum,
        "train_batch_size": plan.global_batch_sequences,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # BF16_Optimizer: fp32 gradient accumulation and masters in flat buffers (with
        # offload DeepSpeed keeps its ZeRO optimizer, which accumulates as it always did).
        # Its gradients are all-reduced in fp32 too: by default DeepSpeed sends them in bf16
        # and copies the rounded sums back, undoing the fp32 accumulation (Megatron reduces
        # bf16 runs' gradients in fp32 for the same reason).
        **({"data_types": {"grad_accum_dtype": "fp32"}, "communication_data_type": "fp32"}
           if par.bf16_optimizer(trainable, precision) else {}),
        "fp16": {"enabled": precision == "fp16", "initial_scale_power": 16},
        "steps_per_print": 1 << 30,
        "wall_clock_breakdown": False,
    }
    if trainable:
        if optim is None:
            raise ValueError("a trainable engine needs an OptimConfig")
        cfg["gradient_clipping"] = optim.grad_clip
        # torch_adam: torch.optim.AdamW instead of JIT-built fused/cpu Adam (50 s builds on CPU);
        # with offload DeepSpeed would otherwise insist on its own CPU Adam.
        cfg["optimizer"] = {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
            "weight_decay": optim.weight_decay, "torch_adam": True}}
        cfg["zero_force_ds_cpu_optimizer"] = False
    return cfg


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices/embeddings (dim >= 2), not biases or norm gains (GPT-2/nanoGPT recipe)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        ndim = len(p.ds_shape) if hasattr(p, "ds_shape") else p.dim()  # ZeRO-3 params are flat
        (decay if ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def adamw(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.AdamW:
    """torch AdamW over `groups`, fused where torch supports the parameters' device/dtype."""
    kw = dict(lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
              weight_decay=optim.weight_decay)
    try:
        return torch.optim.AdamW(groups, fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel here: torch's default (foreach)
        return torch.optim.AdamW(groups, **kw)


def apply_activation_checkpointing(model: nn.Module) -> bool:
    """Turn on activation checkpointing via the model's own hook; False when it has none."""
    method = getattr(model, "set_activation_checkpointing", None)
    if callable(method):
        method(True)
        return True
    try:
        from trellis.model.build import set_activation_checkpointing  # lazily: model/ is optional here
    except ImportError:
        log.warning("activation_checkpointing requested but %s has no "
                    "set_activation_checkpointing and model.build provides none; skipped",
                    type(model).__name__)
        return False
    set_activation_checkpointing(model, True)
    return True


def zero_init_context(par: ParallelConfig, plan: BatchPlan | None = None):
    """Context to build a model already partitioned under ZeRO-3 (no full copy on any rank);
    a no-op context for other stages. Needs the process group. Build layers separately
    (deep-copied layers fail under zero.Init)."""
    if par.zero_stage != 3:
        return contextlib.nullcontext()
    import deepspeed
    plan = plan or BatchPlan.from_config(par, seq_len=1, world_size=dist.get_world_size())
    return deepspeed.zero.Init(config_dict_or_path=ds_config(None, par, plan, trainable=False))


def _quiet_deepspeed() -> None:
    """DeepSpeed logs config dumps at INFO and ZeRO-3 trips torch's collective-rename
    FutureWarnings every step; TRELLIS_DS_VERBOSE=1 keeps them."""
    if os.environ.get("TRELLIS_DS_VERBOSE"):
        return
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", category=FutureWarning,
                            message=r".*torch\.distributed\.\w+` is deprecated")


def _quiet_prints() -> contextlib.AbstractContextManager:
    """DeepSpeed's prints to stdout: BF16_Optimizer's memory usage (see_memory_usage(
    force=True)), 12 lines per engine, and zero_to_fp32's 'Reconstructed fp32 state dict'
    lines per consolidation; TRELLIS_DS_VERBOSE=1 keeps them."""
    if os.environ.get("TRELLIS_DS_VERBOSE"):
        return contextlib.nullcontext()
    return contextlib.redirect_stdout(io.StringIO())


class Engine:
    """A DeepSpeed engine over `model`, configured from our dataclasses.

    trainable=False gives a frozen inference engine (no optimizer; ZeRO-3 partitioned when
    par.zero_stage == 3), e.g. for reference and reward models.
    Creates a single-process group when none exists (in-process / --local use).
    """

    def __init__(self, model: nn.Module, optim: OptimConfig | None, par: ParallelConfig,
                 total_steps: int, trainable: bool = True, plan: BatchPlan | None = None):
        import deepspeed
        if not dist.is_initialized():
            dist.init_distributed(0, 1, backend=par.backend)
        _quiet_deepspeed()
        world = dist.get_world_size()
        if not trainable and world == 1 and par.zero_stage == 3 and not par.offload_params:
            # Nothing to partition across one rank, and ZeRO-3's gather hooks doubled a frozen
            # forward (tiny GPT on CPU: 31 vs 14 ms): a lone frozen rank runs stage 0.
            par = replace(par, zero_stage=0)
        # auto resolves here, where the model's width is known (ds_config reads par alone)
        self.requested_precision, self.width = par.precision, model_width(model)
        par = replace(par, precision=resolve_precision(par.precision, self.width))
        self.plan = plan or BatchPlan.from_config(par, seq_len=1, world_size=world)
        if self.plan.world != world:
            raise ValueError(f"batch plan is for {self.plan.world} ranks, process group has {world}")
        if trainable and total_steps < 1:
            raise ValueError(f"total_steps must be >= 1, got {total_steps}")
        self.par, self.optim, self.total_steps, self.trainable = par, optim, total_steps, trainable
        self.config = ds_config(optim, par, self.plan, trainable)
        self.zero_stage = self.config["zero_optimization"]["stage"]
        if par.activation_checkpointing:
            apply_activation_checkpointing(model)
        # Stage 0 fp32 has no DeepSpeed wrapper optimizer that records the gradient norm: clip
        # here (torch's foreach norm, which returns it) instead of DeepSpeed's clip, which
        # would compute the norm a second time.
        self._manual_norm = trainable and self.zero_stage == 0 and self.precision == "fp32"
        if trainable:
            config = {k: v for k, v in self.config.items() if k != "optimizer"}
            if self._manual_norm:
                config["gradient_clipping"] = 0.0
            with _quiet_prints():
                self._ds, *_ = deepspeed.initialize(
                    model=model, optimizer=adamw(param_groups(model, optim.weight_decay), optim),
                    config=config, lr_scheduler=make_lambda_lr(optim, total_steps))
            if world == 1 and (self.zero_stage == 0 or par.bf16_optimizer(True, par.precision)):
                # An average over one rank. BF16_Optimizer has no reduce of its own: DeepSpeed's
                # fallback flattened, all-reduced and copied back every fp32 gradient each step
                # (nanoGPT's recipe: 1.4 of 22.8 ms backward). Stage 1's ZeRO optimizer needs
                # its reduce (it fills the fp32 partitions), so it keeps it.
                self._ds.enable_backward_allreduce = False
        else:
            model.requires_grad_(False)
            self._ds, *_ = deepspeed.initialize(model=model, config=self.config)
            self._ds.eval()

    # ---- running -------------------------------------------------------------------------
    @property
    def module(self) -> nn.Module:
        """The underlying nn.Module (ZeRO-3 params are gathered by hooks during forward)."""
        return self._ds.module

    @property
    def precision(self) -> str:
        """The compute precision in use: 'auto' already resolved for this device and model."""
        return self.par.precision

    @property
    def device(self) -> torch.device:
        return torch.device(self._ds.device)

    @property
    def global_step(self) -> int:
        """Optimizer steps taken (restored by load)."""
        return int(self._ds.global_steps)

    @property
    def lr(self) -> float:
        return float(self._ds.get_lr()[0]) if self.trainable else 0.0

    def __call__(self, *args: Any, **kw: Any) -> Any:
        return self.forward(*args, **kw)

    def forward(self, *args: Any, **kw: Any) -> Any:
        return self._ds(*args, **kw)

    def compile(self, backend: str = "inductor") -> None:
        """torch.compile the module's forward in place (DeepSpeed's engine.compile, i.e.
        nn.Module.compile): parameter names, checkpoints and exports are unchanged. Code that
        must stay eager runs under torch.compiler.set_stance("force_eager")."""
        self._ds.compile(backend=backend)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch loss (DeepSpeed scales it by 1/grad_accum)."""
        self._require_trainable("backward")
        self._ds.backward(loss)

    def step(self) -> dict[str, float]:
        """End of a micro-batch; at the accumulation boundary also an optimizer step.
        Returns {} or {'step', 'lr' (used by this step), 'grad_norm' (pre-clip)}."""
        self._require_trainable("step")
        boundary = self._ds.is_gradient_accumulation_boundary()
        lr = self.lr
        norm = self._grad_norm() if boundary and self._manual_norm else None
        self._ds.step()
        if not boundary:
            return {}
        if norm is None:
            norm = self._ds.get_global_grad_norm()
        info = {"step": self.global_step, "lr": lr}
        if norm is not None:
            info["grad_norm"] = float(norm)
        return info

    def _grad_norm(self) -> float:
        """The pre-clip global gradient norm; clips to optim.grad_clip when it is > 0."""
        params = [p for p in self.module.parameters() if p.grad is not None]
        if not params:
            return 0.0
        clip = self.optim.grad_clip if self.optim.grad_clip > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(params, clip))

    def eval(self) -> "Engine":
        self._ds.eval()
        return self

    def train(self) -> "Engine":
        self._require_trainable("train")
        self._ds.train()
        return self

    def _require_trainable(self, what: str) -> None:
        if not self.trainable:
            raise RuntimeError(f"Engine.{what}() on a frozen (trainable=False) engine")

    # ---- parameters ----------------------------------------------------------------------
    def local_param_numel(self) -> int:
        """Parameter elements this rank holds (its ZeRO-3 partition, else every element)."""
        return sum(p.ds_tensor.numel() if hasattr(p, "ds_tensor") else p.numel()
                   for p in self.module.parameters())

    def global_param_numel(self) -> int:
        return sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                   for p in self.module.parameters())

    def consolidated_state_dict(self) -> dict[str, torch.Tensor]:
        """Full module state dict as fp32 CPU tensors, on every rank. Collective under ZeRO-3
        (all ranks must call). Under bf16/fp16 these are the compute weights upcast; the fp32
        master weights come from consolidate(checkpoint)."""
        params = list(self.module.parameters())
        ctx = contextlib.nullcontext()
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        with ctx:
            return {k: v.detach().float().cpu().clone() for k, v in self.module.state_dict().items()}

    # ---- checkpoints ---------------------------------------------------------------------
    def save(self, directory: str | Path, client_state: dict | None = None) -> None:
        """Collective: every rank writes its shards into `directory`."""
        self._ds.save_checkpoint(str(directory), tag=TAG, client_state=client_state or {})

    def load(self, directory: str | Path) -> dict:
        """Collective: restore module, optimizer, scheduler and step; returns client_state.
        DeepSpeed reads the files with torch.load forced to weights_only=True (parallel.
        safe_load); a file holding anything else raises CheckpointError naming it."""
        from trellis.parallel.safe_load import check_files, safe_torch_load
        tag_dir = Path(directory) / TAG
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"no engine checkpoint in '{directory}'")
        check_files(sorted(tag_dir.glob("*.pt")))  # every rank refuses before any collective
        with safe_torch_load():
            path, client_state = self._ds.load_checkpoint(
                str(directory), tag=TAG, load_optimizer_states=self.trainable,
                load_lr_scheduler_states=self.trainable)
        if path is None:
            raise FileNotFoundError(f"no engine checkpoint in '{directory}'")
        return dict(client_state or {})

    @staticmethod
    def consolidate(directory: str | Path) -> dict[str, torch.Tensor]:
        """fp32 state dict from an engine checkpoint written by save(), on one process:
        DeepSpeed's zero_to_fp32 for ZeRO 1-3, the saved module for stage 0. Every file is read
        weights_only (parallel.safe_load); a refused, unreadable or inconsistent checkpoint
        raises CheckpointError, one line naming the file or directory."""
        from trellis.parallel.checkpoint import CheckpointError
        from trellis.parallel.safe_load import check_files, load_file, safe_torch_load
        tag_dir = Path(directory) / TAG
        if not tag_dir.is_dir():
            raise FileNotFoundError(f"no engine checkpoint in '{directory}'")
        check_files(sorted(tag_dir.glob("*.pt")))
        try:
            optim = sorted(tag_dir.glob("*optim_states.pt"))
            if optim:
                from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
                with safe_torch_load(), _quiet_prints():
                    if "zero_stage" in torch.load(optim[0], mmap=True)["optimizer_state_dict"]:
                        sd = get_fp32_state_dict_from_zero_checkpoint(str(directory), tag=TAG)
                    else:
                        sd = _bf16_optimizer_masters(tag_dir)
            else:  # ZeRO-0: DeepSpeed's own model-state file holds the full module
                sd = load_file(tag_dir / "mp_rank_00_model_states.pt")["module"]
            return {k: v.float() for k, v in sd.items()}
        except (CheckpointError, FileNotFoundError):
            raise
        except Exception as e:  # a malformed but safe file: DeepSpeed's KeyError, ValueError...
            first = (str(e).strip().splitlines() or [""])[0]
            raise CheckpointError(f"engine checkpoint '{tag_dir}' cannot be consolidated: "
                                  f"{type(e).__name__}: {first}") from e


def _bf16_optimizer_masters(tag_dir: Path) -> dict[str, torch.Tensor]:
    """The fp32 masters of a BF16_Optimizer checkpoint (bf16 at ZeRO 0/1), which zero_to_fp32
    refuses ('not a zero checkpoint': its state has no zero_stage key). Its flat fp32 groups
    are partitioned and padded as ZeRO-1/2's, so zero_to_fp32's stage-2 merge assembles them."""
    from deepspeed.checkpoint.constants import (OPTIMIZER_STATE_DICT, PARTITION_COUNT,
                                                SINGLE_PARTITION_OF_FP32_GROUPS)
    from deepspeed.utils import zero_to_fp32 as z

    from trellis.parallel.checkpoint import CheckpointError
    model_states = z.parse_model_states(z.get_model_state_files(str(tag_dir)))
    files = sorted(tag_dir.glob("*zero_pp_rank_*_optim_states.pt"),
                   key=lambda f: int(f.name.split("rank_")[1].split("_")[0]))  # by rank
    states = [torch.load(f, map_location="cpu")[OPTIMIZER_STATE_DICT] for f in files]
    world = max(states[0][PARTITION_COUNT])
    if world != len(files):
        raise CheckpointError(f"engine checkpoint '{tag_dir}' has {len(files)} optimizer "
                              f"shards for {world} ranks")
    groups = [s[SINGLE_PARTITION_OF_FP32_GROUPS] for s in states]
    return z._get_fp32_state_dict_from_zero2_checkpoint(world, groups, model_states,
                                                        exclude_frozen_parameters=False)
