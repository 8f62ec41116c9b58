"""The embedding anchor's wall time: a fresh process that imports sentence-transformers, loads the model and
encodes a prompt file, as a user of it would (`python -m rshard_hpc.bench.st_anchor FOLDER PROMPTS.jsonl`).

It prints one JSON line: the seconds spent importing, loading and encoding. The suite times the process."""
from __future__ import annotations

import json
import sys
import time


def main(argv: list) -> None:
    folder, prompts, device, batch = argv[0], argv[1], argv[2], int(argv[3])
    t0 = time.perf_counter()
    from sentence_transformers import SentenceTransformer

    t1 = time.perf_counter()
    model = SentenceTransformer(folder, device=device).float()  # fp32 also from fp16 safetensors
    with open(prompts) as f:
        texts = [json.loads(line)["text"] for line in f if line.strip()]
    t2 = time.perf_counter()
    model.encode(texts, batch_size=batch, convert_to_numpy=True)
    t3 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "encode_s": t3 - t2, "prompts": len(texts)}))


if __name__ == "__main__":
    main(sys.argv[1:])
