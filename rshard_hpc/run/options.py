"""The options of `rshard run`, as one dataclass (the CLI, job files and tests build it)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rshard_hpc.errors import InputError
from rshard_hpc.models.registry import DEFAULT_MODEL
from rshard_hpc.plan.schemes import DEFAULT_DELTA, PlanSpec


TASKS = ("embed", "generate")


@dataclass
class RunOptions:
    """Every option of `rshard run` with its default: the one place those defaults are written (the CLI reads
    them from here; the plan's come from PlanSpec)."""

    task: str = TASKS[0]
    model: str = DEFAULT_MODEL
    prompts: str = ""
    out: str = ""
    alpha: int = PlanSpec.alpha
    beta: int = PlanSpec.beta
    scheme: str = PlanSpec.scheme
    c: int = PlanSpec.c
    c_a: int = PlanSpec.c_a
    seed: int = PlanSpec.seed
    plan_file: str | None = None
    batch_tokens: int = 8192
    resume: bool = False
    overwrite: bool = False
    truncate: bool = False
    device: str = "cpu"
    gpu_aware_mpi: str = "auto"
    gpu_ipc: str = "auto"
    dtype: str = "float32"
    progress: bool = True
    generate: dict = field(default_factory=dict)  # generation settings (task "generate")
    min_delta: int = DEFAULT_DELTA  # refuse a plan whose δ is below this (architecture.md §4, docs/privacy.md)
    allow_weak_plan: bool = False  # run a plan below min_delta anyway (with a warning)
    public_prefix: int = -1  # positions known to all (BOS, [CLS], a template); -1: what the tokenizer adds

    def plan_spec(self) -> PlanSpec:
        explicit = None
        if self.plan_file:
            try:
                explicit = json.loads(Path(self.plan_file).read_text())
            except (OSError, ValueError) as exc:
                raise InputError(f"cannot read plan file {self.plan_file}: {exc}") from exc
        spec = PlanSpec(self.scheme, self.alpha, self.beta, self.c, self.c_a, self.seed, explicit,
                        target_delta=max(1, self.min_delta))
        spec.check()
        return spec
