"""Client-side generation (architecture.md §5): final norm, LM head and sampling run on the client only; each new
token id goes to the CompNode that owns its position, and every decode step moves only the new positions."""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import numpy as np

from rshard_hpc.engine import trace
from rshard_hpc.errors import InputError


@dataclass(frozen=True)
class GenerateSettings:
    max_new_tokens: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no top-k cut
    top_p: float = 1.0  # 1: no nucleus cut
    seed: int = 0  # sampling seed; each prompt draws from its own stream (seed, prompt id)
    stop: tuple = ()  # stop strings (cut from the text)
    chat: bool = False  # apply the model's chat template to each prompt

    def __post_init__(self):
        """Refuse settings that cannot sample: an InputError naming the option and the value."""
        if not self.max_new_tokens >= 1:
            raise InputError(f"--max-new-tokens must be at least 1 (got {self.max_new_tokens})")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):  # NaN fails both
            raise InputError(f"--temperature must be a finite number >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise InputError(f"--top-p must lie in (0, 1] (1: no nucleus cut), got {self.top_p}")
        if not self.top_k >= 0:
            raise InputError(f"--top-k must be >= 0 (0: no top-k cut), got {self.top_k}")

    @classmethod
    def from_dict(cls, values: dict) -> "GenerateSettings":
        """The settings of `rshard run`'s generation options, checked (see check_context for the model's)."""
        known = {k: v for k, v in values.items() if k in cls.__dataclass_fields__}
        if "stop" in known:
            known["stop"] = tuple(known["stop"] or ())
        return cls(**known)

    def check_context(self, max_positions: int) -> None:
        """Refuse --max-new-tokens that leaves no room for a prompt in the model's context (architecture.md §5:
        a prompt may have at most max_positions - max_new_tokens tokens)."""
        if self.max_new_tokens >= max_positions:
            raise InputError(f"--max-new-tokens {self.max_new_tokens} does not fit the model's context of "
                             f"{max_positions} positions (prompt and new tokens together): use at most "
                             f"{max_positions - 1}")


class LmHead:
    """Final RMSNorm and LM head, on the client only, on its array module (CuPy when the client has a GPU).
    rows: (n, d) -> logits (n, vocab) float32 NumPy (sampling runs on the host)."""

    def __init__(self, path, cfg, xp=np):
        from rshard_hpc.models.llama import load_head

        self.cfg, self.xp = cfg, xp
        self.tensors = load_head(path, cfg, xp=xp)

    def logits(self, rows: np.ndarray) -> np.ndarray:
        from rshard_hpc.models.llama import head_logits
        from rshard_hpc.ops.arrays import to_host

        return to_host(head_logits(self.cfg, self.tensors, self.xp.asarray(rows)))


def sample(logits: np.ndarray, settings: GenerateSettings, rng: np.random.Generator) -> int:
    """One token id from (vocab,) logits: greedy at temperature 0, else temperature, top-k, top-p."""
    if settings.temperature <= 0:
        return int(np.argmax(logits))
    z = logits.astype(np.float64) / settings.temperature
    if 0 < settings.top_k < len(z):
        kth = np.partition(z, -settings.top_k)[-settings.top_k]
        z = np.where(z >= kth, z, -np.inf)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if settings.top_p < 1.0:
        order = np.argsort(-probs, kind="stable")
        cum = np.cumsum(probs[order])
        keep = order[: int(np.searchsorted(cum, settings.top_p) + 1)]
        mask = np.zeros_like(probs, dtype=bool)
        mask[keep] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))


def prompt_rng(settings: GenerateSettings, prompt_id: str) -> np.random.Generator:
    """A reproducible stream per prompt, whatever batch the prompt lands in."""
    return np.random.default_rng([settings.seed, zlib.crc32(prompt_id.encode())])


class _Sequence:
    def __init__(self, prompt_ids, rng):
        self.prompt_len = len(prompt_ids)
        self.new: list[int] = []
        self.rng = rng
        self.done = False
        self.text = ""

    @property
    def length(self) -> int:
        return self.prompt_len + len(self.new)


def generate_batch(client, codec, cfg, head: LmHead, prompts, prompt_ids, settings: GenerateSettings,
                   progress=None):
    """Decode a batch together; finished sequences drop out. Returns (token id lists, texts).

    progress(step, new_tokens), when given, is called after the prefill (step 0, no token) and after each
    sampling step s >= 1 with the tokens it generated (run/progress.Progress.generate_step)."""
    progress = progress or (lambda step, new_tokens: None)
    seqs = [_Sequence(p, prompt_rng(settings, pid)) for p, pid in zip(prompts, prompt_ids)]
    client.begin_batch([s.prompt_len + settings.max_new_tokens for s in seqs])
    rows = client.step([(0, s.prompt_len) for s in seqs], prompts, "last")  # (B, d)
    progress(0, 0)
    live = list(range(len(seqs)))
    step = 0
    while True:
        logits = head.logits(rows)  # (len(live), vocab)
        trace.mark("logits")
        for row, b in enumerate(live):
            _accept(seqs[b], sample(logits[row], settings, seqs[b].rng), codec, cfg, settings)
        step += 1
        progress(step, len(live))
        live = [b for b in live if not seqs[b].done]
        if not live:
            break
        ranges = [(s.length - 1, s.length) if b in live else (s.length, s.length) for b, s in enumerate(seqs)]
        ids = [[s.new[-1]] if b in live else [] for b, s in enumerate(seqs)]
        rows = client.step(ranges, ids, "last")
    client.end_batch()
    return [s.new for s in seqs], [s.text for s in seqs]


def _accept(seq: _Sequence, token: int, codec, cfg, settings: GenerateSettings) -> None:
    seq.new.append(token)
    seq.text = codec.decode(seq.new)
    if token in cfg.eos_token_ids:
        seq.done = True
    for stop in settings.stop:
        cut = seq.text.find(stop)
        if stop and cut >= 0:
            seq.text = seq.text[:cut]
            seq.done = True
    if len(seq.new) >= settings.max_new_tokens:
        seq.done = True
