"""The client's tokenizer, rebuilt offline from the weight file's /tokenizer."""
from __future__ import annotations

from tokenizers import Tokenizer

from rshard_hpc.models import weights
from rshard_hpc.models.config import ModelConfig


class TextCodec:
    def __init__(self, path, cfg: ModelConfig):
        self.cfg = cfg
        self.tok = Tokenizer.from_str(weights.read_tokenizer(path)["json"])
        self.tok.no_truncation()
        self.tok.no_padding()
        # encoders: [CLS] … [SEP] from the post-processor; decoders: plain text gets no BOS (as transformers)
        self.add_special = cfg.arch == "bert"

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=self.add_special).ids

    def encode_truncated(self, text: str, limit: int) -> list[int]:
        """At most `limit` ids, special tokens kept (as sentence-transformers truncates)."""
        self.tok.enable_truncation(max_length=limit)
        try:
            return self.encode(text)
        finally:
            self.tok.no_truncation()

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)
