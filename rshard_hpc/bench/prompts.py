"""The benchmark suite's prompts: seeded word soup, written as a prompt file (no network, no model needed),
and prompts of an exact token count for a given tokenizer."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

_WORD_TEXT = """the of and to in is was for on that with as by at from his her it an be this are or had not but
which have one were they all their there been has when who will more no if out so said what up its about into
than them can only other new some time could these two may then first any like now over such our man me
even most made after also did many before must through back years where much your way well down should
because each just those people how too little state good very make world still own see men work long get here
between both life being under never day same another know while last might us great old year off come since
against go came right used take three states himself few house use during without again place around however
home small found thought went say part once general high upon school every every does got united left number
course war until always away something fact though water less public put think almost hand enough far took head
yet government system better set told nothing night end why called did eyes find going look asked later knew
point next city business give group toward young days let room president side social given present several order
national possible rather second face per among form important often things looking early white case john become
large big need four within felt along children saw best church ever least power development light thing seemed
family interest want members mind country area others done turned although open god service problem certain kind
different thus began door help sense means whole matter perhaps itself york times law human line above name
example action company hands local show five history whether gave either act today feet across taken past quite
anything seen having death week experience body word half really field am car words already themselves information
tell shall together college money period held keep sure free real probably seems political cannot behind miss
question air office making brought whose special major heard problems ago became federal moment study available
known result street economic boy position reason change south board individual job society areas west close
turn love community true court force full seem am policy wife future age wanted voice center woman control common
necessary following front sometimes six girl clear further land run students provide feel party able mother
music education university child effect level stood military town short morning total outside rate figure class
art century"""
WORDS = list(dict.fromkeys(_WORD_TEXT.split()))  # common English words, each once


def word_prompts(count: int, min_words: int = 12, max_words: int = 200, seed: int = 0) -> list[str]:
    """`count` prompts of min_words..max_words words each (uniform), drawn from WORDS; the same for a seed."""
    if count < 1 or not 1 <= min_words <= max_words:
        raise ValueError(f"need count >= 1 and 1 <= min_words <= max_words (got {count}, {min_words}, {max_words})")
    rng = np.random.default_rng(seed)
    lengths = rng.integers(min_words, max_words + 1, count)
    return [" ".join(WORDS[i] for i in rng.integers(0, len(WORDS), n)).capitalize() + "." for n in lengths]


def token_prompts(codec, count: int, n_tokens: int, seed: int = 0) -> list[str]:
    """`count` prompts that `codec` (run.TextCodec) encodes to exactly n_tokens ids, special tokens included:
    words while they fit, then one-token words ("a") to fill up."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(count):
        words = []
        for i in rng.integers(0, len(WORDS), n_tokens):
            if len(codec.encode(" ".join(words + [WORDS[i]]))) > n_tokens:
                break
            words.append(WORDS[i])
        while len(codec.encode(" ".join(words))) < n_tokens:
            words.append("a")
        if len(codec.encode(" ".join(words))) != n_tokens:
            raise ValueError(f"cannot make a prompt of exactly {n_tokens} tokens with this tokenizer")
        out.append(" ".join(words))
    return out


def write_prompts(path, texts: list[str]) -> Path:
    """A JSONL prompt file, ids p0000, p0001, … (strings: the results file keeps them in order)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": prompt_id(i), "text": t}) + "\n" for i, t in enumerate(texts)))
    return path


def prompt_id(index: int) -> str:
    return f"p{index:05d}"
