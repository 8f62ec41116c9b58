"""The options of `rshard run`, as one dataclass (the CLI, job files and tests build it)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from rshard_hpc.errors import InputError
from rshard_hpc.models.registry import DEFAULT_MODEL
from rshard_hpc.plan.schemes import DEFAULT_DELTA, PlanSpec, check_explicit


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
        """The plan these options describe, checked: a bad plan file, a plan file without --scheme explicit,
        or a negative --min-delta is an InputError (raised alike on every rank, before any work)."""
        if self.min_delta < 0:
            raise InputError(f"--min-delta must be >= 0 (0: no privacy check), got {self.min_delta}")
        if self.plan_file and self.scheme != "explicit":
            raise InputError(f"--plan-file {self.plan_file} needs --scheme explicit (the scheme is {self.scheme!r}: "
                             f"the file would be ignored)")
        spec = PlanSpec(self.scheme, self.alpha, self.beta, self.c, self.c_a, self.seed, self._read_plan_file(),
                        target_delta=max(1, self.min_delta))
        spec.check()
        return spec

    def _read_plan_file(self):
        if not self.plan_file:
            return None
        try:
            plan = json.loads(Path(self.plan_file).read_text())
        except (OSError, ValueError) as exc:
            raise InputError(f"cannot read plan file {self.plan_file}: {exc}") from exc
        check_explicit(plan, self.alpha, self.beta, f"plan file {self.plan_file}")
        return plan
