"""`rshard bench suite`: every row of issue 13's performance table with its plaintext anchor, in one run.

A plain process (not under MPI) that, for each row, layout and GPU setting, starts the sharded side as an MPI
job (`LAUNCHER -n N python -m rshard_hpc.cli run|bench job …`), reads the job's own numbers (the run summary's
in-job seconds, bench job's table) and its wall time, runs the plaintext anchor in this process on the same
device (anchors.py), compares the outputs, and writes one markdown table. A row that fails (a job's error, a
timeout, a missing package) is a failed row with the error's last lines, never the end of the suite.
"""
from __future__ import annotations

import re
import shutil
import tempfile
import time
import traceback
from dataclasses import dataclass, field, replace
from pathlib import Path

import h5py

from rshard_hpc.bench import launch
from rshard_hpc.bench.anchors import ST_BATCH, Anchors
from rshard_hpc.bench.common import append_table
from rshard_hpc.bench.job_outputs import read_bench_table, read_embeddings
from rshard_hpc.bench.prompts import word_prompts, write_prompts
from rshard_hpc.bench.suite_rows import Row, RowFailed
from rshard_hpc.bench.suite_workloads import ROWS
from rshard_hpc.run.options import SMALL_JOB_ON_CPU_ENV

CPU_ROWS = ("cpu-one", "cpu-batch", "cpu-lines")  # MiniLM on CPU ranks, whatever --device says
ROW_NAMES = ("embed-file", "embed-small", "decode", "generate-file", "prefill-512", "prefill-8k") + CPU_ROWS
DEFAULT_ROWS = {"cpu": "cpu-one,cpu-batch,cpu-lines,embed-small,embed-file", "gpu": "embed-file,embed-small,decode,generate-file,"
                                                                          "prefill-512,prefill-8k"}
QUOTED_CPU = "SPU-Puma 36.3 s, CrypTen 15.6 s for one 128-token input (quoted from their papers, not rerun)"


@dataclass(frozen=True)
class Sizes:
    """The workloads' sizes: the issue's (FULL) or tiny ones for CI (QUICK); options override single fields."""
    embed_prompts: int = 4096  # embed-file: prompts of 12-200 words
    small_prompts: int = 12  # embed-small
    cpu_tokens: int = 128  # cpu-one, cpu-batch: tokens of each input ([CLS] and [SEP] included)
    cpu_batch: int = 64  # cpu-batch: inputs in one job
    line_prompts: int = 2000  # cpu-lines: one-line prompts (LINE_WORDS words each) in one job
    shape: str = "smollm2"  # decode, prefill: bench job's random-weight Llama shape
    layers: int | None = None  # that shape's layers (None: all)
    prefill_short: int = 512
    prefill_long: int = 8192
    decode_tokens: int = 8192  # the prompt before the decode steps
    decode_steps: int = 8
    gen_prompts: int = 64  # generate-file: prompts of 8-40 words, one batch
    gen_new_tokens: int = 32  # generate-file: new tokens each (fewer where a prompt ends)
    repeats: int = 3  # timed repeats (median) of anchors, of the CPU rows' jobs and of the embedding file's


FULL = Sizes()
QUICK = Sizes(embed_prompts=16, small_prompts=4, cpu_tokens=24, cpu_batch=3, line_prompts=5, shape="tiny", prefill_short=32,
              prefill_long=64, decode_tokens=64, decode_steps=2, gen_prompts=3, gen_new_tokens=3, repeats=1)


@dataclass(frozen=True)
class Layout:
    alpha: int
    beta: int
    c_a: int = 1

    @property
    def ranks(self) -> int:
        return 1 + self.alpha + self.beta ** 2

    def args(self) -> list:
        return ["--alpha", self.alpha, "--beta", self.beta, "--c-a", self.c_a]

    def __str__(self) -> str:
        return f"α={self.alpha} β={self.beta} c_a={self.c_a} ({self.ranks} ranks)"


def parse_layouts(text: str) -> list:
    """"3x3c2,2x2" -> [Layout(3, 3, 2), Layout(2, 2, 1)]."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        m = re.fullmatch(r"(\d+)x(\d+)(?:c(\d+))?", item)
        if not m:
            raise ValueError(f"layout {item!r}: write ALPHAxBETA or ALPHAxBETAcC_A, e.g. 3x3c2")
        out.append(Layout(int(m[1]), int(m[2]), int(m[3] or 1)))
    return out


@dataclass(frozen=True)
class Setting:
    """Where a row runs: the layout, the GPUs the job sees (None: all, or no GPU) and CUDA MPS."""
    layout: Layout
    device: str
    gpus: int | None = None
    mps: bool = False
    env: dict = field(default_factory=dict, compare=False, hash=False)

    def label(self) -> str:
        if self.device == "cpu":
            return f"{self.layout}, CPU"
        gpus = "all GPUs" if self.gpus is None else f"{self.gpus} GPU{'s' if self.gpus != 1 else ''}"
        return f"{self.layout}, {gpus}, MPS {'on' if self.mps else 'off'}"


@dataclass
class Options:
    device: str = "cpu"
    rows: tuple = ()
    layouts: tuple = ()
    mps: str = "off"  # on | off | both (GPU only)
    gpus: tuple = (1,)  # GPU counts a job sees (None: all)
    sizes: Sizes = FULL
    launcher: str = ""
    model: str = "all-MiniLM-L6-v2"  # the embedding rows' rshard model (a bundled name or a weight file)
    st_model: str | None = None  # sentence-transformers' folder of the same model (None: the bundled package's)
    batch_tokens: int | None = None
    timeout_s: float = 600  # one subprocess
    time_limit_s: float | None = None  # the whole suite: later rows are skipped
    out: str = ""
    workdir: str | None = None


class Suite:
    def __init__(self, opts: Options, echo=print):
        self.opts, self.sizes, self.echo = opts, opts.sizes, echo
        self.launcher = opts.launcher or launch.default_launcher()
        self.anchors = Anchors(opts.device, opts.sizes.repeats, opts.st_model)
        self.started = time.perf_counter()
        self.rows: list = []
        self.notes: list = []
        self._bench_tables = {}
        self._embed_kernels_compiled = False
        self._work = Path(opts.workdir or tempfile.mkdtemp(prefix="rshard-bench-suite-"))

    # ------------------------------------------------------------------------------------------------ driving
    def run(self) -> str:
        cpu_rows = [r for r in self.opts.rows if r in CPU_ROWS]
        dev_rows = [r for r in self.opts.rows if r not in CPU_ROWS]
        for layout in self.opts.layouts:
            for name in cpu_rows:
                self._run_row(name, Setting(layout, "cpu"))
        if dev_rows and self.opts.device == "cpu":
            for layout in self.opts.layouts:
                for name in dev_rows:
                    self._run_row(name, Setting(layout, "cpu"))
        elif dev_rows:
            for mps in {"on": [True], "off": [False], "both": [False, True]}[self.opts.mps]:
                self._gpu_rows(dev_rows, mps)
        return self.table()

    def _gpu_rows(self, names: list, mps: bool) -> None:
        with launch.mps_daemon(mps) as (mps_env, note):
            if mps_env is None:
                self.notes.append(note)
                self.echo(f"[suite] {note}")
                return
            if note:
                self.notes.append(note)
            for gpus in self.opts.gpus:
                for layout in self.opts.layouts:
                    env = dict(mps_env, **launch.gpu_env(gpus))
                    if {"embed-file", "embed-small"} & set(names):
                        self._compile_embed_kernels(Setting(layout, "gpu", gpus, mps, env))
                    for name in names:
                        self._run_row(name, Setting(layout, "gpu", gpus, mps, env))

    def _compile_embed_kernels(self, setting: Setting) -> None:
        """Once a suite: an untimed GPU embedding job (a few prompts, kept on the GPUs) before the timed ones, so
        that no timed row includes the kernels' first compile on a fresh machine (NVRTC, then cached on disk in
        RSHARD_CACHE: a node pays it once); its wall is a note."""
        if self._embed_kernels_compiled:
            return
        self._embed_kernels_compiled = True
        prompts = write_prompts(self._work / "compile.jsonl", word_prompts(4, seed=2))
        warm = replace(setting, env=dict(setting.env or {}, **{SMALL_JOB_ON_CPU_ENV: "0"}))
        try:
            job = self.embed_job(warm, prompts, "compile")
            self.notes.append(f"before the embedding rows, an untimed 4-prompt GPU job at {setting.label()} "
                              f"(the kernels' first use: compiled unless cached): {job['wall_s']:.1f} s wall")
        except RowFailed as exc:
            self.notes.append(f"the untimed kernel warm-up job failed: {exc}")

    def _run_row(self, name: str, setting: Setting) -> None:
        limit = self.opts.time_limit_s
        if limit is not None and time.perf_counter() - self.started > limit:
            self.rows.append(Row(name, setting.label(), "skipped: the suite's --time-limit-s was reached"))
            return
        self.echo(f"[suite] {name}: {setting.label()} ({time.perf_counter() - self.started:.0f} s so far)")
        try:
            rows = ROWS[name](self, setting)
        except Exception as exc:  # noqa: BLE001 - a failed row is reported, the suite goes on
            why = str(exc) if isinstance(exc, RowFailed) else traceback.format_exc(limit=4)
            rows = [Row(name, setting.label(), "", failed=why)]
        for row in rows:
            self.echo("[suite]   " + " | ".join(row.cells()))
            if row.failed:
                self.echo(f"[suite]   {name} failed:\n{row.failed}")
        self.rows.extend(rows)
        if self.opts.out:  # the table so far, in case the suite is cut short (OUT.partial; removed at the end)
            Path(self.opts.out + ".partial").write_text(self.table() + "\n")

    # ------------------------------------------------------------------------------------------------ jobs
    def job(self, setting: Setting, args: list) -> launch.Finished:
        """The sharded side: an MPI job of the layout's ranks; RowFailed with its last lines when it fails."""
        cmd = launch.rshard_command(self.launcher, setting.layout.ranks, args)
        done = launch.run_command(cmd, self.opts.timeout_s, env=launch.job_env(setting.env))
        if not done.ok:
            raise RowFailed(done.why())
        return done

    def embed_job(self, setting: Setting, prompts: Path, tag: str) -> dict:
        """`rshard run --task embed` of a prompt file: in-job seconds and tokens (its summary), wall seconds
        (this process's clock around it) and the embeddings in prompt order (its results file)."""
        out = self._work / f"{tag}.h5"
        args = ["run", "--task", "embed", "--model", self.opts.model, "--prompts", prompts, "--out", out, "--overwrite",
                "--quiet", "--truncate", "--allow-weak-plan", "--device", setting.device] + setting.layout.args()
        if self.opts.batch_tokens:
            args += ["--batch-tokens", self.opts.batch_tokens]
        done = self.job(setting, args)
        summary = re.search(r"done: (\d+) prompts, (\d+) tokens in ([0-9.]+) s", done.stderr)
        if summary is None:
            raise RowFailed(f"no `done:` line in the job's output: {done.tail()}")
        with h5py.File(out, "r") as f:
            backend = str(f.attrs["backend"])  # a small job under --device gpu: cpu (RunOptions.device_for)
        return {"job_s": float(summary[3]), "tokens": int(summary[2]), "wall_s": done.wall_s,
                "embeddings": read_embeddings(out), "backend": backend}

    def bench_table(self, setting: Setting, dtype: str) -> dict:
        """bench job's rows by token count for this setting and precision (one job for all rows needing it)."""
        key = (setting.layout, setting.gpus, setting.mps, dtype)
        if key not in self._bench_tables:
            self._bench_tables[key] = self._bench_job(setting, dtype)
        table = self._bench_tables[key]
        if isinstance(table, RowFailed):
            raise table
        return table

    def _bench_job(self, setting: Setting, dtype: str):
        s, rows = self.sizes, self.opts.rows
        tokens = sorted({n for n, row in [(s.prefill_short, "prefill-512"), (s.prefill_long, "prefill-8k"),
                                           (s.decode_tokens if dtype == "float32" else 0, "decode")]
                         if n and row in rows})
        steps = s.decode_steps if dtype == "float32" and "decode" in rows else 0
        out = self._work / f"bench_job_{len(self._bench_tables)}.md"
        args = ["bench", "job", "--shape", s.shape, "--tokens", ",".join(map(str, tokens)), "--decode-steps", steps,
                "--device", setting.device, "--dtype", dtype, "--out", out] + setting.layout.args()
        if s.layers:
            args += ["--layers", s.layers]
        try:
            self.job(setting, args)
            return read_bench_table(out)
        except RowFailed as exc:
            return exc  # kept: the other rows of this job fail with the same words, without running it again

    # ------------------------------------------------------------------------------------------------ output
    def table(self) -> str:
        s = self.sizes
        head = ["workload", "layout", "rshard", "anchor", "ratio", "target", "met?", "output diff"]
        title = (f"rshard bench suite: device {self.opts.device} ({device_name(self.opts.device)}), launcher "
                 f"`{self.launcher}`, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
                 f"{time.perf_counter() - self.started:.0f} s")
        lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(row.cells()) + " |" for row in self.rows]
        lines += ["", "ratio = anchor time / rshard time (rshard's speed relative to the anchor; >= 1: rshard is "
                      f"faster). Anchors run in this process on the same device, after a warm-up, median of {s.repeats}: "
                      + "; ".join(text for rows, text in self._anchor_notes() if set(rows) & set(self.opts.rows))
                      + ". Output diff = max abs difference of the L2-normalized embeddings or of the logits against "
                      "the anchor. In-job seconds are the run summary's `done:` time; wall is the launcher's whole "
                      "process."]
        if any(r in self.opts.rows for r in CPU_ROWS):
            lines.append(f"CPU rows: other anchors, {QUOTED_CPU}; the jobs' times are medians of {s.repeats} jobs "
                         f"(their range beside each, in the same unit; met? reads the median).")
        if "embed-file" in self.opts.rows:
            lines.append(f"The embedding file's times (in the job, wall) are medians of {s.repeats} jobs (the in-job "
                         f"range beside it).")
        lines += [f"Note: {note}" for note in self.notes]
        return "\n".join(lines)


    def _anchor_notes(self) -> list:
        """(the rows it serves, how the anchor is measured)."""
        st = (f"sentence-transformers fp32, batch {ST_BATCH} (its wall: a fresh process that imports, loads and "
              "encodes)")
        prefill = (f"transformers prefill (bench job's plaintext side: the same random {self.sizes.shape} weights, "
                   "same precision)")
        generate = "transformers `generate` fp32 (KV cache, greedy: the median time between successive decode steps)"
        batched = ("transformers `generate` of the whole prompt file in one left-padded batch (SmolLM2 from the same "
                   "GGUF, rshard's token ids, greedy fp32; one timed call after a warm-up)")
        return [(("embed-file", "embed-small"), st), (("prefill-512", "prefill-8k"), prefill), (("decode",), generate),
                (("generate-file",), batched),
                (CPU_ROWS, "rshard's NumPy single-process forward")]


def device_name(device: str) -> str:
    if device != "gpu":
        return "CPU"
    try:
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU seen by torch"
    except ImportError:
        return "GPU"


def default_out(device: str) -> str:
    """docs/bench_suite_<device>.md: cpu, or the GPU's model (h200)."""
    name = device_name(device).split()[-1].lower() if device == "gpu" else "cpu"
    return f"docs/bench_suite_{re.sub(r'[^a-z0-9]+', '', name) or device}.md"


def run_suite(opts: Options, echo=print) -> str:
    """Run the suite, print and append its table to opts.out (default_out when empty); return the table."""
    opts = replace(opts, out=opts.out or default_out(opts.device))
    Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
    suite = Suite(opts, echo)
    try:
        text = suite.run()
    finally:
        if opts.workdir is None:  # prompt files, results files and bench job tables of this run
            shutil.rmtree(suite._work, ignore_errors=True)
    echo(text)
    append_table(opts.out, text)
    Path(opts.out + ".partial").unlink(missing_ok=True)
    return text


def sizes_with(sizes: Sizes, **over) -> Sizes:
    """Sizes with the given fields replaced (None values ignored)."""
    return replace(sizes, **{k: v for k, v in over.items() if v is not None})
