"""`rshard show`: what a results file holds (architecture.md §6), summed up for people: model, task, prompts,
precision, plan, the privacy verdict, time and bytes from /stats, the rshard version that wrote it; and the
picture of what each rank received for one prompt (from /privacy/ledger). Also the reading of a results file
that `rshard export` shares: open it or say plainly why not, its committed ids with their types.
"""
from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from rshard_hpc.errors import InputError
from rshard_hpc.run.prompts import id_key
from rshard_hpc.run.results import ID_KINDS, ROW_DATASETS, committed, read_ids

PHASES = ("prepass", "attention", "postpass", "client_layers", "mpi", "staging")  # /stats/<phase>_s


# ------------------------------------------------------------------------------------------ reading
@contextmanager
def open_results(path):
    """The results file opened for reading; an InputError naming the file when it is missing, not HDF5, or not a
    results file."""
    import h5py

    path = Path(path)
    if not path.exists():
        raise InputError(f"no such results file: {path}")
    if path.is_dir():
        raise InputError(f"{path} is a folder, not a results file")
    try:
        f = h5py.File(path, "r")
    except OSError as exc:
        raise InputError(f"{path} is not a results file (not HDF5: {exc})") from exc
    with f:
        if "rshard_format" in f.attrs:
            raise InputError(f"{path} is a weight file, not a results file")
        if "ids" not in f or ID_KINDS not in f or "task" not in f.attrs:
            raise InputError(f"{path} is not a results file (no /ids, /{ID_KINDS} or task attribute)")
        yield f


def read_json(f, name: str):
    """A JSON document of the file (/privacy/json), or None when the job never wrote it."""
    return json.loads(f[name].asstr()[()]) if name in f else None


def _attr(f, key: str, default=None):
    value = f.attrs.get(key, default)
    return value.item() if isinstance(value, np.generic) else value


# ------------------------------------------------------------------------------------------ the summary
def summarize(path) -> dict:
    """What `rshard show` prints, as a document."""
    with open_results(path) as f:
        n = committed(f)
        return {
            "file": str(path), "version": _attr(f, "version"), "model": _attr(f, "model"),
            "model_name": _attr(f, "model_name"), "task": _attr(f, "task"), "prompts": n,
            "unfinished_rows": max([f[name].shape[0] for name in ROW_DATASETS if name in f], default=n) - n,
            "precision": _attr(f, "precision"), "backend": _attr(f, "backend"),
            "world_size": _attr(f, "world_size"), "plan": json.loads(_attr(f, "plan_params", "{}")),
            "output": _output(f, n), "privacy": _privacy(read_json(f, "privacy/json")),
            "stats": _stats(f["stats"]) if "stats" in f else None,
        }


def _output(f, n: int) -> dict:
    if "embeddings" in f:
        return {"embedding_dim": int(f["embeddings"].shape[1])}
    if "generated/token_ids" in f:
        return {"new_tokens": int(sum(len(t) for t in f["generated/token_ids"][:n]))}
    return {}


def _privacy(doc) -> dict | None:
    """The verdict of /privacy/json: δ against --min-delta, the prompts covered, the ledger check."""
    if doc is None:
        return None
    check = doc.get("ledger_check", {})
    return {"delta": doc["delta"], "min_delta": doc["min_delta"], "meets_min_delta": doc["meets_min_delta"],
            "allow_weak_plan": doc.get("allow_weak_plan", False), "public_prefix": doc["public_prefix"],
            "prompts": doc["prompts"], "consistent": check.get("consistent"),
            "inside_views": check.get("inside_views"),
            "prompts_seen_whole": len({x["prompt"] for x in check.get("seen_whole", [])}),
            "exposed_prompts": len(doc.get("exposed_prompts", {})), "client_layers": doc.get("client_layers", 0),
            "comp_input": doc.get("comp_input", "token_id")}


def _stats(group) -> dict:
    """Per phase the slowest rank's seconds (the phases of different ranks overlap: the slowest bounds the
    wall time) and the sum over ranks; bytes summed over ranks; the transports the workers used."""
    roles = group["role"].asstr()[()].tolist()
    out = {"phases": {}, "ranks": len(roles)}
    for phase in PHASES:
        if f"{phase}_s" in group and (phase != "client_layers" or group[f"{phase}_s"][()].any()):  # K > 0 only
            seconds = group[f"{phase}_s"][()]
            slowest = int(np.argmax(seconds))
            out["phases"][phase] = {"max": float(seconds[slowest]), "sum": float(seconds.sum()),
                                    "slowest": roles[slowest]}
    sent = group["bytes_sent"][()]
    out["bytes_sent"], out["bytes_received"] = int(sent.sum()), int(group["bytes_received"][()].sum())
    out["most_sent"] = {"bytes": int(sent.max()), "by": roles[int(np.argmax(sent))]}
    out["transports"] = sorted(set(group["transport"].asstr()[()].tolist()[1:]))  # the workers' (the client: host)
    return out


def render_summary(s: dict) -> str:
    """`rshard show`'s text."""
    lines = [f"results:   {s['file']} (written by rshard {s['version']})",
             f"model:     {s['model']} ({s['model_name']})",
             f"task:      {s['task']}, {_prompts_text(s)}",
             f"precision: {s['precision']} on {s['backend']}",
             f"plan:      {_plan_text(s['plan'], s['world_size'])}"]
    lines += _privacy_lines(s["privacy"])
    lines += _stats_lines(s["stats"])
    return "\n".join(lines)


def _prompts_text(s: dict) -> str:
    out = s["output"]
    text = f"{s['prompts']} prompt{'' if s['prompts'] == 1 else 's'}"
    if "embedding_dim" in out:
        text += f" (embeddings of {out['embedding_dim']} floats)"
    if "new_tokens" in out:
        text += f" ({out['new_tokens']} new tokens)"
    if s["unfinished_rows"]:
        text += f"; {s['unfinished_rows']} rows of a batch cut short (--resume drops them)"
    return text


def _plan_text(p: dict, world_size) -> str:
    alpha, beta = p.get("alpha"), p.get("beta")
    text = f"{p.get('scheme')} alpha={alpha} beta={beta} c={p.get('c')} c_a={p.get('c_a')}"
    if p.get("scheme") == "random":
        text += f" seed={p.get('seed')}"
    comps = f"{alpha} CompNode{'' if alpha == 1 else 's'}"
    return text + f"; {world_size} ranks (client, {comps}, {beta}×{beta} AttnNodes)"


def _privacy_lines(p: dict | None) -> list:
    if p is None:
        return ["privacy:   no report (the job did not finish; run it again with --resume)"]
    verdict = "meets" if p["meets_min_delta"] else "BELOW"
    if not p["min_delta"]:
        verdict = "not checked:"
    lines = [f"privacy:   delta = {_num(p['delta'])} ({verdict} --min-delta {_num(p['min_delta'])}"
             + (", run with --allow-weak-plan" if p["allow_weak_plan"] else "")
             + f"; public prefix {p['public_prefix']}); the report covers {p['prompts']} prompts"]
    check = "consistent with the plan" if p["consistent"] else "NOT consistent with the plan"
    if p["inside_views"] is False:
        check += ": a rank received positions outside its view"
    whole = p["prompts_seen_whole"]
    lines.append(f"ledger:    {check}; " + (f"{whole} prompts seen whole by some rank" if whole
                                            else "no rank saw a whole prompt"))
    if p["client_layers"]:
        lines.append(f"client:    ran the first {p['client_layers']} layers; CompNodes received {p['comp_input']} rows, "
                     f"not token ids")
    if p["exposed_prompts"]:
        lines.append(f"warning:   {p['exposed_prompts']} prompts too short for the plan to split")
    return lines


def _stats_lines(st: dict | None) -> list:
    if st is None:
        return ["stats:     none (the job did not finish)"]
    phases = ", ".join(f"{name} {v['max']:.3g} / {v['sum']:.3g}" for name, v in st["phases"].items())
    return [f"time (s):  slowest rank / all {st['ranks']} ranks: {phases}",
            (f"bytes:     {_size(st['bytes_sent'])} sent between ranks (most by {st['most_sent']['by']}: "
             f"{_size(st['most_sent']['bytes'])}); transport {', '.join(st['transports']) or 'none'}")]


def _num(x) -> str:
    """2.0 as 2, 'inf' as inf."""
    return f"{x:g}" if isinstance(x, (int, float)) else str(x)


def _size(n: int) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


# ------------------------------------------------------------------------------------------ the picture
def draw_prompt(path, picture, prompt: str | None = None) -> str:
    """Draw what each rank received for one prompt (`prompt` as reports spell its id, default the first) to
    `picture` (.png or .svg); returns a line saying which prompt was drawn and where."""
    from rshard_hpc.plan.picture import draw, ledger_picture, picture_format

    picture_format(picture)
    with open_results(path) as f:
        ids = read_ids(f)
        docs = [json.loads(x) for x in f["privacy/ledger"].asstr()[()]] if "privacy/ledger" in f else []
        report = read_json(f, "privacy/json") or {}
        plan = json.loads(_attr(f, "plan_params", "{}"))
    if not ids or not docs:
        raise InputError(f"{path} holds no finished prompt to draw")
    index = choose_prompt(ids, prompt)
    key = id_key(ids[index])
    draw(ledger_picture(docs, key, plan, report.get("public_prefix", 0)), picture)
    return f"picture of prompt {key} (prompt {index + 1} of {len(ids)}) in {picture}"


def choose_prompt(ids: list, prompt: str | None) -> int:
    """The index of the prompt a user named: as reports spell it (id_key: `1` the integer, `"1"` the string),
    else a string id by its plain text; the first prompt when none is named."""
    if prompt is None:
        return 0
    keys = [id_key(x) for x in ids]
    if prompt in keys:
        return keys.index(prompt)
    plain = [i for i, x in enumerate(ids) if x == prompt]
    if plain:
        return plain[0]
    shown = ", ".join(keys[:5]) + (", …" if len(keys) > 5 else "")
    raise InputError(f"no prompt {prompt} in the results file (ids: {shown})")
