"""Per-sample random draws: the one source of every random number a sampler uses.

Sample ``i`` of a request with seed ``s`` draws everything from its own
generator, seeded from ``(s, i)`` (as EDM's StackedRandomGenerator does). So
image ``i`` of ``sample(n, seed)`` is the same whatever the chunk size, whatever
other requests share its batch, and on every backend; and the draws for a chunk
are made when the chunk runs, so memory is O(chunk), not O(n x steps).

Draw order of one sample (:data:`DRAW_ORDER`, recorded in every plan):

1. x_T: ``C*H*W`` standard normals;
2. its label, when the model is class-conditional and none was given:
   one ``randint(num_classes)``;
3. at each stochastic step (``c_noise != 0``), in step order: ``C*H*W``
   standard normals, drawn right after that step's model call.
"""

from __future__ import annotations

import numbers
from typing import Iterable, Sequence

import numpy as np
import torch

from autodiffusion_rt.errors import SamplingError

__all__ = ["DRAW_ORDER", "MAX_SEED", "SampleNoise", "check_seed", "sample_generator_seed"]

#: The name of the draw order above; a plan records it, and a change to the order gets a new name.
DRAW_ORDER = "per-sample-v1"
#: Seeds are integers in [0, MAX_SEED): the one range used by the CLI, the Python API and HTTP.
MAX_SEED = 2**63


def check_seed(seed, name: str = "seed") -> int:
    """``seed`` as an int if it is an integer in [0, 2^63); a clear error otherwise."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, numbers.Integral):
        raise SamplingError(f"{name}={seed!r} is not an integer: pass an integer in [0, 2^63)")
    if not 0 <= int(seed) < MAX_SEED:
        raise SamplingError(f"{name}={seed} is outside [0, 2^63): pass an integer in that range")
    return int(seed)


def sample_generator_seed(seed: int, index: int) -> int:
    """The 63-bit seed of sample ``index``'s generator for request seed ``seed``.

    numpy's SeedSequence hashes the pair, so neighbouring (seed, index) pairs
    give unrelated streams (seed + index would make sample 1 of seed 0 equal
    sample 0 of seed 1).
    """
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 ^ int(state[1])) % MAX_SEED


class SampleNoise:
    """One ``torch.Generator`` per sample; draws return ``(n, *shape)`` stacks.

    ``SampleNoise(seed, n)`` is samples 0..n-1 of a request;
    :meth:`for_requests` stacks several requests (each its own seed, indices
    from 0) into one batch, as the sampling service merges them; ``noise[a:b]``
    is a chunk sharing the same generators (their states advance together).
    """

    def __init__(self, seed: int, indices: int | Iterable[int], *, device: torch.device | str | None = None):
        seed = check_seed(seed)
        idx = range(indices) if isinstance(indices, numbers.Integral) else indices
        self._init([(seed, int(i)) for i in idx], device)

    def _init(self, keys: Sequence[tuple[int, int]], device) -> None:
        self.keys = tuple(keys)
        self.device = torch.device("cpu") if device is None else torch.device(device)
        self.generators = [
            torch.Generator(device=self.device).manual_seed(sample_generator_seed(s, i)) for s, i in self.keys
        ]

    @classmethod
    def for_requests(cls, requests: Sequence[tuple[int, int]], *, device=None) -> "SampleNoise":
        """``[(seed, n), ...]`` -> one stack: request r's samples 0..n_r-1, in request order."""
        self = cls.__new__(cls)
        self._init([(check_seed(s), i) for s, n in requests for i in range(int(n))], device)
        return self

    def __len__(self) -> int:
        return len(self.generators)

    def __getitem__(self, rows: slice) -> "SampleNoise":
        if not isinstance(rows, slice):
            raise TypeError("index a SampleNoise with a slice of rows")
        view = SampleNoise.__new__(SampleNoise)
        view.keys, view.device, view.generators = self.keys[rows], self.device, self.generators[rows]
        return view

    def randn(
        self, shape: Sequence[int], *, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None
    ) -> torch.Tensor:
        """One standard-normal draw of ``shape`` per sample, stacked: ``(n, *shape)``."""
        shape = tuple(int(s) for s in shape)
        if out is None:
            out = torch.empty((len(self), *shape), dtype=dtype, device=self.device)
        for row, g in zip(out, self.generators):
            torch.randn(shape, generator=g, dtype=dtype, device=self.device, out=row)
        return out

    def randint(self, high: int, where: torch.Tensor | None = None) -> torch.Tensor:
        """One integer in [0, high) per sample (only the rows where ``where`` is True): int64."""
        gens = self.generators if where is None else [g for g, w in zip(self.generators, where.tolist()) if w]
        if not gens:
            return torch.empty(0, dtype=torch.long, device=self.device)
        return torch.cat([torch.randint(int(high), (1,), generator=g, device=self.device) for g in gens])
