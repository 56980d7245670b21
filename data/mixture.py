"""Deterministic weighted mixture of prepared sources, shared by all data-parallel ranks.

Every rank computes the same global stream of sample references (source, index); rank r keeps
draws r, r + W, r + 2W, ... so ranks see disjoint samples whose union is the whole stream.
Randomness is counter-based (NumPy generators seeded by (seed, purpose, block)), so the stream
position is a few integers and resuming needs no pickled RNG objects.

Weights are per sample, not per token: "general 340 : reasoning 550" means that, in expectation,
340 of every 890 drawn samples come from general.
"""
import numpy as np

_BLOCK = 4096
_CHOICE_TAG = 0x6D6978  # separates the source-choice streams from the permutation streams


def parse_weights(spec):
    """"general:340,reasoning:550" -> {"general": 340.0, "reasoning": 550.0}."""
    out = {}
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        name, _, w = part.rpartition(":")
        if not name:
            raise ValueError(f"mixture entry {part!r} must be NAME:WEIGHT")
        out[name] = float(w)
    return out


class SampleStream:
    """Infinite global stream of (source, index); each source is walked in seeded epochs.

    Source ``s`` in its epoch ``e`` is visited in the order ``permutation(seed, s, e)``, so every
    sample of a source appears once per epoch of that source.
    """

    def __init__(self, sizes, weights, seed):
        if len(sizes) != len(weights) or not sizes:
            raise ValueError("need one weight per source")
        if any(n <= 0 for n in sizes):
            raise ValueError("every source needs at least one sample")
        w = np.asarray(weights, dtype=np.float64)
        if np.any(w < 0) or w.sum() <= 0:
            raise ValueError("mixture weights must be non-negative with a positive sum")
        self.sizes = [int(n) for n in sizes]
        self.probs = w / w.sum()
        self.seed = int(seed)
        self.g = 0
        self.epochs = [0] * len(sizes)
        self.pos = [0] * len(sizes)
        self._block_id, self._block = None, None
        self._perms = {}

    def _choice(self, g):
        b = g // _BLOCK
        if b != self._block_id:
            if len(self.sizes) == 1:
                self._block = np.zeros(_BLOCK, dtype=np.int64)
            else:
                rng = np.random.default_rng([self.seed, _CHOICE_TAG, b])
                self._block = rng.choice(len(self.sizes), size=_BLOCK, p=self.probs)
            self._block_id = b
        return int(self._block[g % _BLOCK])

    def _perm(self, s):
        key = (s, self.epochs[s])
        p = self._perms.get(s)
        if p is None or p[0] != key:
            order = np.random.default_rng([self.seed, s, self.epochs[s]]).permutation(self.sizes[s])
            p = (key, order)
            self._perms[s] = p
        return p[1]

    def next(self):
        """(global draw number, source, sample index) and advance."""
        g = self.g
        s = self._choice(g)
        idx = int(self._perm(s)[self.pos[s]])
        self.pos[s] += 1
        if self.pos[s] == self.sizes[s]:
            self.pos[s] = 0
            self.epochs[s] += 1
        self.g += 1
        return g, s, idx

    def state_dict(self):
        return {"g": self.g, "epochs": list(self.epochs), "pos": list(self.pos)}

    def load_state_dict(self, state):
        if len(state["epochs"]) != len(self.sizes):
            raise ValueError("stream state has a different number of sources")
        self.g = int(state["g"])
        self.epochs = [int(e) for e in state["epochs"]]
        self.pos = [int(p) for p in state["pos"]]
