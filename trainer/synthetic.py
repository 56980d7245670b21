"""Random-token packed rows for benchmarks and trainer tests, with the SFT batch contract.

Row g of the global stream depends only on (seed, g), and rank r's micro-batch m of step s holds
rows s*G + r*A*B + m*B + b (G = W*A*B rows per step, A accumulation steps, B rows per micro-batch),
so any split of a step's rows over ranks and micro-batches trains on the same rows.
"""
from __future__ import annotations

import torch


class SyntheticLoader:
    def __init__(self, vocab_size: int, seq_len: int, micro_batch_size: int, accum: int, rank: int,
                 world_size: int, seed: int, docs_per_row: int = 2):
        self.V, self.S, self.B, self.A = vocab_size, seq_len, micro_batch_size, accum
        self.rank, self.W, self.seed, self.docs = rank, world_size, seed, docs_per_row
        self.step, self.micro = 0, 0
        self.counters = {"samples": 0, "truncated": 0}

    def _row(self, g: int) -> dict[str, torch.Tensor]:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + g)
        # A small repeating pattern per row, so there is something to learn.
        period = int(torch.randint(2, 6, (1,), generator=gen))
        base = torch.randint(1, self.V, (period,), generator=gen)
        ids = base.repeat(self.S // period + 1)[: self.S]
        cut = int(torch.randint(self.S // 4, 3 * self.S // 4, (1,), generator=gen)) if self.docs > 1 else self.S
        doc = torch.zeros(self.S, dtype=torch.long)
        doc[cut:] = 1
        pos = torch.arange(self.S) - torch.where(doc == 1, cut, 0)
        labels = ids.clone()
        labels[0] = -100
        if cut < self.S:
            labels[cut] = -100  # a document's first token is never trained on the previous one
        row = {"input_ids": ids, "labels": labels, "position_ids": pos}
        if self.docs > 1:  # one document per row: no document_ids, so attention is plain causal
            row["document_ids"] = doc
        return row

    def __iter__(self):
        return self

    def __next__(self) -> dict[str, torch.Tensor]:
        G = self.W * self.A * self.B
        first = self.step * G + self.rank * self.A * self.B + self.micro * self.B
        rows = [self._row(first + b) for b in range(self.B)]
        self.micro += 1
        if self.micro == self.A:
            self.micro, self.step = 0, self.step + 1
        self.counters["samples"] += self.B * self.docs
        return {k: torch.stack([r[k] for r in rows]) for k in rows[0]}

    def state_dict(self) -> dict:
        return {"step": self.step, "micro": self.micro, "counters": dict(self.counters)}

    def load_state_dict(self, s: dict) -> None:
        self.step, self.micro, self.counters = s["step"], s["micro"], dict(s["counters"])
