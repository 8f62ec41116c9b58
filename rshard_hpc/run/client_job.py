"""The client's job (rank 0): read and tokenize the prompts, check the plan's privacy, open the results file,
run the batches through the engine, write results, the privacy report and the stats.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import numpy as np

from rshard_hpc import __version__
from rshard_hpc.dist import collectives
from rshard_hpc.engine import trace
from rshard_hpc.engine.generate import GenerateSettings, LmHead, generate_batch
from rshard_hpc.engine.stats import rank_stats
from rshard_hpc.errors import InputError, RshardError
from rshard_hpc.models.client_layers import check_client_layers, comp_input_form
from rshard_hpc.plan.estimates import audit_estimate
from rshard_hpc.plan.schemes import PlanSpec
from rshard_hpc.run import termination, testhooks
from rshard_hpc.run.options import SMALL_JOB_ON_CPU_ENV, TASKS, RunOptions
from rshard_hpc.run.progress import Progress, Stages, process_seconds, say, wall_line
from rshard_hpc.run.prompts import id_key

FIRST_BATCH_SHARE = 4  # an embedding job's first batch: at most 1/4 of --batch-tokens (cut_batches)
# ... and each later one at most this many times the tokens of the one before (up to --batch-tokens): the client
# prepares batch b+1 (its layers) while the workers run batch b, and on 2 cores at 13 ranks the workers took ~3x
# the client's time a token (1,024 tokens in 400 ms while the client prepared 4,096 in 490 ms, then waited for it;
# 64 MiniLM inputs: 1,024 / 3,072 / 4,096 tokens against 1,024 / 4,096 / 3,072, 16 alternating pairs, 14 faster or
# even, 0.14 s less in the job on average; docs/bench_suite_cpu.md)
BATCH_GROWTH = 3


def cut_batches(lengths: list, limit: int, growing: bool) -> list:
    """Consecutive prompts (their token counts, in file order) in batches of up to `limit` tokens (at least one
    prompt a batch), as lists of indices. growing (an embedding job): the first batch fits in 1/FIRST_BATCH_SHARE of
    the limit and each later one in BATCH_GROWTH times the tokens of the one before: the workers wait while the
    client prepares the first alone (with its client layers), each later one while they run the one before
    (encode_batches). Generation keeps whole batches: each batch pays every decode step."""
    budget = max(1, limit // FIRST_BATCH_SHARE) if growing else limit
    batches, batch, tokens = [], [], 0
    for index, n in enumerate(lengths):
        if batch and tokens + n > budget:
            batches.append(batch)
            budget = min(BATCH_GROWTH * tokens, limit) if growing else limit
            batch, tokens = [], 0
        batch.append(index)
        tokens += n
    return batches + ([batch] if batch else [])


@dataclass
class Prepared:
    """What the client found before any work: broadcast to every rank (no token content)."""

    model_path: str
    error: str | None = None
    cfg: object = None  # the model's ModelConfig, read once by the client (workers need not open the weight file)
    client_layers: int = 0  # K as decided for this model (--client-layers, or its default)
    job_tokens: int | None = None  # tokens of work left: prompt tokens, plus tokens to generate (transport choice)
    device: str = "cpu"  # where every rank computes (RunOptions.device_for: --device, or the CPUs for a small job)


def _prepare_client(topo, opts: RunOptions, spec: PlanSpec):
    """Resolve the model, read and tokenize every prompt, open the results file. Errors go to every rank."""
    try:
        return ClientJob(topo, opts, spec)
    except RshardError as exc:
        job = ClientJob.__new__(ClientJob)
        job.prepared, job.writer = Prepared("", str(exc)), None
        return job


class ClientJob:
    def __init__(self, topo, opts: RunOptions, spec: PlanSpec):
        from rshard_hpc.models import weights
        from rshard_hpc.models.registry import resolve_model
        from rshard_hpc.models.tokenizer import TextCodec
        from rshard_hpc.run.fingerprint import job_fingerprint, weights_digest
        from rshard_hpc.run.prompts import read_prompts
        from rshard_hpc.run.results import ResultWriter, check_out_path

        self.topo, self.opts, self.spec = topo, opts, spec
        if opts.task not in TASKS:
            raise InputError(f"unknown task {opts.task!r} ({', '.join(TASKS)})")
        model_path = resolve_model(opts.model, watch=lambda start, end: Stages(start, end, enabled=opts.progress))
        check_out_path(opts.out, prompts=opts.prompts, model=model_path, plan_file=opts.plan_file)
        self.cfg = weights.read_config(model_path)
        self._check_task()
        self.client_layers_given = opts.client_layers is not None
        opts = self.opts = opts.with_client_layers(self.cfg.n_layers)
        check_client_layers(opts.client_layers, self.cfg.n_layers, str(opts.model))
        prompts = read_prompts(opts.prompts)
        self.codec = TextCodec(model_path, self.cfg)
        self.settings = GenerateSettings.from_dict(opts.generate)
        if opts.task == "generate":
            self.settings.check_context(self.cfg.max_positions)
        tokenized = {p.id: self._tokenize(p) for p in prompts}
        self.privacy = self._check_privacy(prompts, tokenized)  # a weak plan is refused before any file is written
        attrs = {"model": str(opts.model), "model_name": self.cfg.name, "task": opts.task, "alpha": opts.alpha,
                 "beta": opts.beta, "plan_scheme": spec.scheme, "plan_params": json.dumps(spec.params()),
                 "backend": opts.device, "precision": opts.dtype, "world_size": topo.world.Get_size(),
                 "client_layers": opts.client_layers, "version": __version__}
        fingerprint = job_fingerprint(opts, self.cfg, weights_digest(model_path), self.settings, spec)
        self.writer = ResultWriter(opts.out, attrs, fingerprint, resume=opts.resume,
                                   overwrite=opts.overwrite)
        todo_in_file = [i for i, p in enumerate(prompts) if p.id not in self.writer.done_ids]
        self.todo = [prompts[i] for i in todo_in_file]
        self.todo_at = {at: n for n, at in enumerate(todo_in_file)}  # file index -> index in todo: batches()
        self.skipped = len(prompts) - len(self.todo)
        self.token_ids = [tokenized[p.id] for p in self.todo]
        self.file_lengths = [len(tokenized[p.id]) for p in prompts]  # every prompt's, done or not: batches()
        self.model_path = model_path
        job_tokens = self._job_tokens()
        self.asked_device = opts.device
        self.opts = replace(opts, device=opts.device_for(job_tokens, self.cfg))
        self.writer.attrs["backend"] = self.opts.device  # what computed (written with the first batch)
        self.prepared = Prepared(str(model_path), cfg=self.cfg, client_layers=opts.client_layers,
                                 job_tokens=job_tokens, device=self.opts.device)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()

    def _plan_length(self, n_tokens: int) -> int:
        """The length plans are made for: the prompt, plus the new tokens when generating (architecture.md §5)."""
        return n_tokens + (self.settings.max_new_tokens if self.opts.task == "generate" else 0)

    def _check_privacy(self, prompts, tokenized) -> dict:
        """Refuse a plan below --min-delta (architecture.md §4) unless --allow-weak-plan; the verdict for the report."""
        from rshard_hpc.plan.check import check_job
        from rshard_hpc.plan.report import tokenizer_public_prefix

        opts = self.opts
        self.public_prefix = opts.public_prefix
        if self.public_prefix < 0:
            self.public_prefix = tokenizer_public_prefix(self.codec, self._chat if self.settings.chat else None)
        shortest = min(prompts, key=lambda p: len(tokenized[p.id]))
        if self.public_prefix > len(tokenized[shortest.id]):
            raise InputError(f"--public-prefix {self.public_prefix} is longer than prompt {shortest.id!r} "
                             f"({opts.prompts}:{shortest.line}, {len(tokenized[shortest.id])} tokens): a public prefix "
                             f"is part of every prompt")
        lengths = {p.id: self._plan_length(len(tokenized[p.id])) for p in prompts}
        verdict = check_job(self.spec, lengths.values(), opts.min_delta, self.public_prefix)
        if not verdict["ok"] and not opts.allow_weak_plan:
            raise InputError(verdict["message"])
        verdict["exposed_prompts"] = {id_key(pid): {"length": len(tokenized[pid]), "seen_whole_by": verdict["exposed"][n]}
                                      for pid, n in lengths.items() if n in verdict["exposed"]}
        return verdict

    def _say_privacy(self) -> None:
        from rshard_hpc.dist.topology import node_label

        v = self.privacy
        say(f"privacy: plan delta={v['delta']:g} (required --min-delta {v['required']:g}, public prefix "
            f"{v['public_prefix']}); report and ledger in {self.opts.out}:/privacy")
        if not v["ok"]:
            say(f"warning: running a plan below the required delta (--allow-weak-plan): {v['message']}")
        exposed = v["exposed_prompts"]
        if exposed:
            shown = "; ".join(f"{pid} ({_tokens(e['length'])}: {', '.join(map(node_label, e['seen_whole_by']))})"
                              for pid, e in list(exposed.items())[:5])
            more = f"; and {len(exposed) - 5} more" if len(exposed) > 5 else ""
            say(f"warning: {len(exposed)} prompt{'s are' if len(exposed) > 1 else ' is'} too short for this plan "
                f"to split: the nodes named see {'them' if len(exposed) > 1 else 'it'} whole: {shown}{more}")

    def _small_job_note(self) -> str:
        """Why the device is not --device's (RunOptions.device_for), or ""."""
        if self.opts.device == self.asked_device:
            return ""
        return (f" (a small job under --device {self.asked_device}: its work costs less than the GPUs' start; "
                f"{SMALL_JOB_ON_CPU_ENV}=0 keeps it there)")

    def _check_task(self) -> None:
        if self.opts.task == "embed" and self.cfg.pooling == "none":
            raise InputError(f"model {self.opts.model} has no sentence-embedding pooling: task embed needs one")
        if self.opts.task == "generate" and not self.cfg.causal:
            raise InputError(f"model {self.opts.model} is an encoder: task generate needs a decoder")

    def _job_tokens(self) -> int:
        """The tokens the servers will carry: every prompt left to do, plus what generation adds to each."""
        generated = len(self.todo) * self.settings.max_new_tokens if self.opts.task == "generate" else 0
        return sum(len(ids) for ids in self.token_ids) + generated

    def _tokenize(self, prompt) -> np.ndarray:
        limit = self.cfg.prompt_limit
        if self.opts.task == "generate":
            limit = self.cfg.max_positions - self.settings.max_new_tokens
        text = self._chat(prompt.text) if self.settings.chat else prompt.text
        ids = self.codec.encode(text)
        if len(ids) > limit:
            if not self.opts.truncate:
                raise InputError(f"prompt {prompt.id!r} ({self.opts.prompts}:{prompt.line}) has {len(ids)} tokens, "
                                 f"over the limit of {limit}; pass --truncate to cut it as sentence-transformers does")
            ids = self.codec.encode_truncated(text, limit)
        if not ids:
            raise InputError(f"prompt {prompt.id!r} ({self.opts.prompts}:{prompt.line}) has no tokens")
        return np.asarray(ids, dtype=np.int64)

    def _chat(self, text: str) -> str:
        from rshard_hpc.models.llama import apply_chat_template

        if not self.cfg.chat_template:
            raise InputError(f"model {self.opts.model} has no chat template: drop --chat")
        return apply_chat_template(self.cfg, [{"role": "user", "content": text}])

    def batches(self):
        """The job's batches, as lists of indices into the prompts to do: the whole prompt file's batches
        (cut_batches; an embedding job's grow from a small first one), less the prompts already done. A resumed job
        thus runs the batches an uninterrupted run would (results are written a whole batch at a time), and its
        embeddings are those of that run, bit for bit."""
        growing = self.opts.task == "embed"
        for batch in cut_batches(self.file_lengths, self.opts.tokens_per_batch, growing):
            todo = [self.todo_at[i] for i in batch if i in self.todo_at]
            if todo:
                yield todo

    def run(self, client) -> None:
        opts = self.opts
        if opts.task == "generate":
            self.head = LmHead(self.model_path, self.cfg, client.xp)
        total_tokens = int(sum(len(x) for x in self.token_ids))
        termination.set_status(self._saved_so_far)
        if self.writer.unfinished_rows:
            say(f"resume: dropped {self.writer.unfinished_rows} rows of a batch that was cut short")
        if self.skipped:
            say(f"resume: {self.skipped} prompts already in {opts.out}, {len(self.todo)} to do")
        say(f"{opts.task} with {opts.model}: {len(self.todo)} prompts, {total_tokens} tokens, "
            f"alpha={opts.alpha} beta={opts.beta} ({self.topo.world.Get_size()} ranks), plan {self.spec.scheme} "
            f"c={self.spec.c} c_a={self.spec.c_a}, device {opts.device}{self._small_job_note()}")
        self._say_privacy()
        if opts.client_layers:
            how = "" if self.client_layers_given else " (the default for this model; --client-layers 0: token ids)"
            say(f"client layers: the client runs the first {opts.client_layers} of {self.cfg.n_layers} layers{how} "
                f"and sends CompNodes layer-{opts.client_layers} hidden rows, not token ids")
        batches = list(self.batches())
        generating = self.settings.max_new_tokens if opts.task == "generate" else 0
        progress = Progress(len(self.todo), total_tokens, enabled=opts.progress, total_batches=len(batches),
                            max_new_tokens=generating)
        started = process_seconds()
        trace.mark("batches")
        if opts.task == "embed":  # pipelined: batch b+1 runs on the workers while batch b is pooled and written
            encoded = client.encode_batches([[self.token_ids[i] for i in batch] for batch in batches],
                                            want="sums" if self.cfg.pooling == "mean" else "all")
        for batch in batches:
            seqs = [self.token_ids[i] for i in batch]
            ids = [self.todo[i].id for i in batch]
            if opts.task == "embed":
                embeddings = self._pool(next(encoded), [len(s) for s in seqs])
                trace.mark("pooled")
                append = lambda: self.writer.append_embeddings(ids, embeddings)  # noqa: E731
            else:
                streams = [id_key(pid) for pid in ids]  # each prompt samples from its own stream
                steps = partial(progress.generate_step, len(batch), int(sum(len(s) for s in seqs)))
                token_ids, texts = generate_batch(client, self.codec, self.cfg, self.head, seqs, streams,
                                                  self.settings, progress=steps)
                append = lambda: self.writer.append_generated(ids, token_ids, texts)  # noqa: E731
            with termination.protected():  # a SIGTERM waits for the batch's rows and its ledger
                append()
                trace.mark("rows written")
                self._append_ledger(client, ids, seqs)
            trace.mark("batch written")
            progress.batch_done(len(batch), int(sum(len(s) for s in seqs)))
            testhooks.at("batch_finished", batch=progress.batches)  # off unless RSHARD_PID_DIR / RSHARD_TEST_SLOW_BATCH_S
        client.stop()
        elapsed = progress.finish()
        winding = time.perf_counter()
        stats = collectives.gather_objects(self.topo.world, rank_stats(self.topo, client.timer.seconds, client.transport))
        with termination.protected():  # the reports are one write a SIGTERM waits for
            testhooks.at("writing_reports")  # off unless RSHARD_TEST_SLOW_REPORTS_S
            self._write_reports(stats)
        trace.mark("reports")
        moved = sum(s["bytes_sent"] for s in stats)
        modes = ", ".join(sorted({s["transport"] for s in stats[1:]}))  # the workers' (the client's is host)
        say(f"done: {len(self.todo)} prompts, {self._work(total_tokens, progress.generated, elapsed)}, "
            f"{moved / 1e6:.1f} MB moved between ranks ({opts.dtype}, {modes})")
        say(wall_line(started, elapsed, time.perf_counter() - winding))
        say(f"results: {Path(opts.out).resolve()}")

    def _work(self, tokens: int, generated: int, elapsed: float) -> str:
        """The summary's throughput: prompt tokens/s when embedding, generated tokens/s when generating."""
        if self.opts.task != "generate":
            return f"{tokens} tokens in {elapsed:.2f} s ({tokens / max(elapsed, 1e-9):,.0f} tokens/s)"
        return (f"{tokens} prompt tokens, {generated} tokens generated in {elapsed:.2f} s "
                f"({generated / max(elapsed, 1e-9):,.0f} tokens/s generated)")

    def _saved_so_far(self) -> str:
        """For the message a SIGTERM prints: what the results file holds and how to finish."""
        total, done = self.skipped + len(self.todo), len(self.writer.done_ids)
        if self.writer.target is None:
            return f"no batch was finished, {self.opts.out} is unchanged; run the same command again"
        return (f"{done} of {total} prompts are in {self.opts.out} (every finished batch); run the same command "
                f"with --resume to finish")

    def _pool(self, encoded, lengths: list) -> np.ndarray:
        """(prompts, d) float32: each prompt's sentence embedding as the model makes it, from what encode_batches
        gave: mean pooling from each prompt's float64 sum of its final rows (want "sums"), or CLS pooling from its
        rows; then optional L2 normalization in float64 (the whole batch at once)."""
        if self.cfg.pooling == "mean":
            vecs = encoded / np.asarray(lengths, dtype=np.float64)[:, None]
        else:
            vecs = np.stack([rows[0] for rows in encoded]).astype(np.float64)
        if self.cfg.normalize:
            vecs /= np.maximum(np.linalg.norm(vecs, axis=1, keepdims=True), 1e-12)
        return vecs.astype(np.float32)

    def _append_ledger(self, client, ids, seqs) -> None:
        """The batch's gathered ledgers, sequence indices mapped to prompt ids, to /privacy/ledger."""
        from rshard_hpc.plan.ledger import ledger_document

        keys = [id_key(pid) for pid in ids]
        for gathered in client.take_ledgers():
            doc = ledger_document(gathered, keys, [len(s) for s in seqs], [self._plan_length(len(s)) for s in seqs])
            trace.mark("ledger made")
            self.writer.append_json("privacy", "ledger", doc)

    def _write_reports(self, stats) -> None:
        """/privacy over every prompt in the file (this run's and earlier runs' batches: the ledger holds them
        all) and /stats of this run."""
        from rshard_hpc.dist.topology import rank_layout
        from rshard_hpc.plan.check import plan_report, report_lengths
        from rshard_hpc.plan.ledger import check_ledger
        from rshard_hpc.plan.report import jsonable

        pp, vocab, causal = self.public_prefix, self.cfg.vocab_size, self.cfg.causal
        ledger_docs = self.writer.read_json_rows("privacy", "ledger")
        plan_lens = [p["plan_length"] for doc in ledger_docs for p in doc["prompts"].values()]
        verdict = self.privacy
        self.writer.write_json("privacy", jsonable({
            "plan": self.spec.params(), "layout": rank_layout(self.opts.alpha, self.opts.beta),
            "public_prefix": pp, "vocab": vocab, "causal": causal,
            "min_delta": self.opts.min_delta, "allow_weak_plan": self.opts.allow_weak_plan,
            "client_layers": self.opts.client_layers, "n_layers": self.cfg.n_layers,  # the client ran 0 … K-1
            "comp_input": comp_input_form(self.opts.client_layers),  # what CompNodes received: ids or layer-K rows
            "client_layers_given": self.client_layers_given,  # False: the default for this model (docs/privacy.md)
            # what the audit measured the best attack to recover from one node at this K (a measurement on SmolLM2
            # at the default layout, not a bound: plan/estimates.py, docs/privacy.md)
            "audit_estimate": audit_estimate(self.opts.client_layers),
            "delta": verdict["delta"], "meets_min_delta": verdict["ok"], "suggestion": verdict["suggestion"],
            "exposed_prompts": verdict["exposed_prompts"],
            "prompts": len(plan_lens),
            "ledger_check": check_ledger(ledger_docs, self.spec, pp, causal),
            "by_length": {str(n): plan_report(self.spec, n, pp, vocab, causal) for n in report_lengths(plan_lens)},
        }))
        columns = {key: [s[key] for s in stats] for key in stats[0]}
        self.writer.write_table("stats", columns)


def _tokens(n: int) -> str:
    return f"{n} token{'s' if n != 1 else ''}"
