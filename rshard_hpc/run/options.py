"""The options of `rshard run`, as one dataclass (the CLI, job files and tests build it)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field, replace
from pathlib import Path

from rshard_hpc.dist.topology import world_size_for
from rshard_hpc.errors import InputError
from rshard_hpc.models.registry import DEFAULT_MODEL
from rshard_hpc.plan.check import strided_delta
from rshard_hpc.plan.schemes import DEFAULT_DELTA, PlanSpec, check_explicit


TASKS = ("embed", "generate")
# --batch-tokens when not given, by --device. CPUs: smaller batches let the client's layers of batch b+1 run
# while the workers compute batch b, and keep a layer's arrays nearer the caches (64 MiniLM inputs of 128 tokens,
# 13 ranks on 2 cores: 2.47-2.99 s at 8192, 2.14-2.24 s at 4096, 2.40-2.47 s at 2048; docs/bench_suite_cpu.md).
# GPUs: a step's fixed cost is paid per batch, so larger batches (8192-65536 measured alike, bench_suite_h200.md).
DEFAULT_BATCH_TOKENS = {"cpu": 4096, "gpu": 8192}
# Under --device gpu, an embedding job whose products take fewer FLOPs than this runs every rank on its CPUs
# (RunOptions.device_for): a GPU rank's start, CuPy's import and a CUDA context, costs 1.2-1.4 s at 13 ranks on one
# GPU, more than such a job's whole work on the node's cores. About 4,700 MiniLM tokens (37 prompts of 128).
SMALL_JOB_FLOP = 1e11
SMALL_JOB_ON_CPU_ENV = "RSHARD_SMALL_JOB_ON_CPU"  # "0": --device gpu keeps small jobs on the GPUs


@dataclass
class RunOptions:
    """Every option of `rshard run` with its default: the one place those defaults are written (the CLI reads
    them from here; the plan's come from PlanSpec). alpha, beta, c and c_a are None when not given: with_layout
    fills in alpha, beta (and c_a) from the world size when neither alpha nor beta is given (default_layout), and
    PlanSpec's values stand for the others."""

    task: str = TASKS[0]
    model: str = DEFAULT_MODEL
    prompts: str = ""
    out: str = ""
    alpha: int | None = None  # None with beta None: the most private layout for the world size (default_layout)
    beta: int | None = None
    scheme: str = PlanSpec.scheme
    c: int | None = None  # None: PlanSpec's (1)
    c_a: int | None = None  # None: the default layout's when it is chosen, else PlanSpec's (1)
    seed: int = PlanSpec.seed
    plan_file: str | None = None
    batch_tokens: int | None = None  # None: DEFAULT_BATCH_TOKENS of the device (tokens_per_batch)
    resume: bool = False
    overwrite: bool = False
    truncate: bool = False
    device: str = "cpu"
    transport: str = "auto"  # GPU workers: auto|staged|mpi|ipc|nccl (dist/transport_choice.py)
    dtype: str = "float32"
    progress: bool = True
    generate: dict = field(default_factory=dict)  # generation settings (task "generate")
    min_delta: int = DEFAULT_DELTA  # refuse a plan whose δ is below this (architecture.md §4, docs/privacy.md)
    allow_weak_plan: bool = False  # run a plan below min_delta anyway (with a warning)
    public_prefix: int = -1  # positions known to all (BOS, [CLS], a template); -1: what the tokenizer adds
    client_layers: int | None = None  # K: the client runs layers 0 … K-1 and sends CompNodes layer-K rows, not
    # token ids; None: plan.estimates.default_client_layers of the model (with_client_layers, once it is read)

    def plan_spec(self) -> PlanSpec:
        """The plan these options describe, checked: a bad plan file, a plan file without --scheme explicit,
        or a negative --min-delta is an InputError (raised alike on every rank, before any work)."""
        if self.min_delta < 0:
            raise InputError(f"--min-delta must be >= 0 (0: no privacy check), got {self.min_delta}")
        if self.plan_file and self.scheme != "explicit":
            raise InputError(f"--plan-file {self.plan_file} needs --scheme explicit (the scheme is {self.scheme!r}: "
                             f"the file would be ignored)")
        spec = PlanSpec(self.scheme, *self._layout(), self.seed, self._read_plan_file(),
                        target_delta=max(1, self.min_delta))
        spec.check()
        return spec

    def _layout(self) -> tuple[int, int, int, int]:
        """(alpha, beta, c, c_a), PlanSpec's values where not given."""
        values = (self.alpha, self.beta, self.c, self.c_a)
        return tuple(getattr(PlanSpec, k) if v is None else v for k, v in zip(("alpha", "beta", "c", "c_a"), values))

    @property
    def tokens_per_batch(self) -> int:
        """--batch-tokens, or its default for the device."""
        return DEFAULT_BATCH_TOKENS[self.device] if self.batch_tokens is None else self.batch_tokens

    def device_for(self, job_tokens: int | None, cfg) -> str:
        """The device every rank of this job computes on: --device, except that under --device gpu an embedding
        job of job_tokens tokens whose products (cfg.layer_matrix_params a layer and token) take fewer than
        SMALL_JOB_FLOP runs on the CPUs, where no rank imports CuPy or makes a CUDA context (unless
        RSHARD_SMALL_JOB_ON_CPU=0). Generation stays on the GPUs: its decode steps are many."""
        if self.device != "gpu" or self.task != "embed" or job_tokens is None:
            return self.device
        if os.environ.get(SMALL_JOB_ON_CPU_ENV, "1").strip() == "0":
            return self.device
        flop = 2.0 * cfg.n_layers * cfg.layer_matrix_params * job_tokens
        return "cpu" if flop < SMALL_JOB_FLOP else self.device

    def client_on_gpu(self, job_tokens: int | None = None) -> bool:
        """The client takes its node's GPU (--device gpu) when it computes: the LM head of every generated token, or
        the first K layers (--client-layers) of a job of job_tokens tokens (None: not known) unless the job is small
        (< transport_choice.SMALL_JOB_TOKENS): then its layers run on NumPy, and one CUDA context fewer shares the
        GPU while every rank starts (about 0.2 s of a 13-rank job's wall on one GPU: docs/bench_suite_h200.md)."""
        from rshard_hpc.dist.transport_choice import SMALL_JOB_TOKENS

        if self.device != "gpu":
            return False
        small = job_tokens is not None and job_tokens < SMALL_JOB_TOKENS
        return self.task == "generate" or (bool(self.client_layers) and not small)

    def with_client_layers(self, n_layers: int) -> RunOptions:
        """These options with K decided for a model of n_layers layers (the default when not given)."""
        from rshard_hpc.plan.estimates import default_client_layers

        if self.client_layers is not None:
            return self
        return replace(self, client_layers=default_client_layers(n_layers))

    def with_layout(self, world_size: int | None) -> tuple["RunOptions", str | None]:
        """These options with alpha and beta filled in, and the line that says how (None when given): with neither
        given, default_layout for `world_size` (the same on every rank, no communication needed; None: the fewest
        ranks reaching --min-delta); with one, PlanSpec's for the other. An InputError, alike on every rank, when
        no layout of this size reaches --min-delta (unless --allow-weak-plan) or an explicit plan has no layout."""
        if self.alpha is not None or self.beta is not None:
            alpha, beta = self._layout()[:2]
            return replace(self, alpha=alpha, beta=beta), None
        if self.scheme == "explicit":
            raise InputError("--scheme explicit needs --alpha and --beta: the layout the plan file was made for")
        PlanSpec(self.scheme, 1, 1, *self._layout()[2:]).check()  # chunk lengths >= 1
        if world_size is None:  # (`rshard plan` without --ranks)
            world_size = smallest_world(self.min_delta, self.c, self.c_a) or world_size_for(3, 3)
        found = default_layout(world_size, self.min_delta, self.c, self.c_a)
        if found is None or (found["delta"] < self.min_delta and not self.allow_weak_plan):
            raise InputError(_no_layout(world_size, found, self.min_delta, self.c, self.c_a))
        chosen = replace(self, alpha=found["alpha"], beta=found["beta"], c_a=found["c_a"])
        return chosen, (f"layout: alpha={found['alpha']} beta={found['beta']} c_a={found['c_a']} (the most private "
                        f"for {world_size} ranks; give --alpha/--beta to choose)")

    def _read_plan_file(self):
        if not self.plan_file:
            return None
        try:
            plan = json.loads(Path(self.plan_file).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read plan file {self.plan_file}: {exc}") from exc
        check_explicit(plan, *self._layout()[:2], f"plan file {self.plan_file}")
        return plan


# ------------------------------------------------------------------------------------------ the default layout
def default_layout(world_size: int, min_delta: float = DEFAULT_DELTA, c: int | None = None,
                   c_a: int | None = None) -> dict | None:
    """The layout `rshard run` takes on `world_size` ranks when --alpha and --beta are not given: among the
    layouts with 1 + alpha + beta² = world_size, the strided plan with the largest δ on long prompts
    (plan/check.py's strided_delta: min((alpha−1)·c, c_a) for alpha >= 2 and beta >= 3, else 0), then the smallest
    share of positions any node sees (1/alpha for a CompNode, 2/beta for an AttnNode), then the larger beta.
    c is the user's (1 by default); c_a the user's, else the shortest chunk reaching --min-delta and at least 2.

    A pure function of the world size and the options: prompt lengths are not needed, so every rank finds the
    same layout by itself. {"alpha", "beta", "c", "c_a", "delta"}, or None below 3 ranks (no layout)."""
    c = PlanSpec.c if c is None else c
    c_a = max(DEFAULT_DELTA, math.ceil(min_delta)) if c_a is None else c_a
    options = []
    for beta in range(1, math.isqrt(max(world_size - 2, 0)) + 1):
        alpha = world_size - 1 - beta * beta
        delta = _long_delta(PlanSpec("strided", alpha, beta, c, c_a))
        options.append(((-delta, max(1 / alpha, min(1.0, 2 / beta)), -beta),
                        {"alpha": alpha, "beta": beta, "c": c, "c_a": c_a, "delta": delta}))
    return min(options, key=lambda o: o[0])[1] if options else None


def _long_delta(spec: PlanSpec) -> float:
    """A strided plan's δ on long prompts: at a length past alpha chunks of c and three chunks of c_a."""
    return strided_delta(spec, 2 * (spec.alpha * spec.c + spec.beta * spec.c_a) + 1)


def smallest_world(min_delta: float, c: int | None = None, c_a: int | None = None) -> int | None:
    """The fewest ranks whose default layout reaches min_delta (None when c_a caps the AttnNode gaps below it):
    beta = 3 and alpha − 1 >= min_delta / c (architecture.md §4)."""
    if min_delta <= 0:
        return world_size_for(1, 1)
    found = default_layout(world_size_for(1, 3), min_delta, c, c_a)
    if found["c_a"] < min_delta:
        return None
    return world_size_for(1 + max(1, math.ceil(min_delta / found["c"])), 3)


def _no_layout(world_size: int, found: dict | None, min_delta: float, c, c_a) -> str:
    """Why no layout of world_size ranks will do, and the world size that would."""
    best = (f"the most private, alpha={found['alpha']} beta={found['beta']} c={found['c']} c_a={found['c_a']}, has "
            f"delta={found['delta']:g} on long prompts" if found else "none exists: 1 + alpha + beta^2 >= 3")
    fewest = smallest_world(min_delta, c, c_a)
    if fewest is None:
        where = f"none does with --c-a {c_a} (no AttnNode gap exceeds c_a): give --c-a {math.ceil(min_delta)} or more"
    else:
        at = default_layout(fewest, min_delta, c, c_a)
        where = (f"the smallest world size that does is {fewest} (mpiexec -n {fewest}: alpha={at['alpha']} "
                 f"beta={at['beta']} c_a={at['c_a']})")
    return (f"no layout of {world_size} ranks reaches --min-delta {min_delta:g} ({best}); {where}. Or give --alpha "
            f"and --beta (with --allow-weak-plan to run a weaker plan; docs/privacy.md)")
