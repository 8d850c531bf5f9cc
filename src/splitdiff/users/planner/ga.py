"""A genetic algorithm over grant vectors, the paper's other baseline (population 100, 200 generations).

Genome: one grant bit per user; a genome over capacity is repaired by dropping random
granted users. Fitness: the objective of the set with its exact splits (exact.best_for_set),
so the GA searches only over who, like the DQN. Tournament selection (size 2), uniform
crossover, bit-flip mutation at rate 1/N, two elites. Seeded: the same scenario and seed
give the same decision.
"""

from __future__ import annotations

import numpy as np

from .exact import best_for_set, set_values
from .latency import gains
from .scenario import Instance


def _repair(pop: np.ndarray, cap: int, rng: np.random.Generator) -> np.ndarray:
    over = np.flatnonzero(pop.sum(1) > cap)
    for p in over:
        on = np.flatnonzero(pop[p])
        pop[p, rng.choice(on, size=len(on) - cap, replace=False)] = False
    return pop


def solve(inst: Instance, population: int = 100, generations: int = 200, seed: int = 0,
          mutation: float | None = None):
    rng = np.random.default_rng(seed)
    g = gains(inst)
    N, cap = inst.N, inst.capacity
    rate = mutation if mutation is not None else 1.0 / max(N, 1)
    cache: dict[bytes, float] = {}

    def fitness(pop: np.ndarray) -> np.ndarray:
        if not inst.shrinking:
            return set_values(inst, pop, g)
        out = np.empty(len(pop))
        for k, genome in enumerate(pop):
            key = np.packbits(genome).tobytes()
            if key not in cache:
                cache[key] = best_for_set(inst, genome, g)[1]
            out[k] = cache[key]
        return out

    density = rng.uniform(0, 1, size=(population, 1)) * min(1.0, cap / max(N, 1))
    pop = _repair(rng.random((population, N)) < density, cap, rng)
    fit = fitness(pop)
    for _ in range(generations):
        elite = pop[np.argsort(-fit)[:2]]
        a, b = rng.integers(population, size=(2, population))
        parents = np.where((fit[a] >= fit[b])[:, None], pop[a], pop[b])
        a, b = rng.integers(population, size=(2, population))
        mates = np.where((fit[a] >= fit[b])[:, None], pop[a], pop[b])
        child = np.where(rng.random((population, N)) < 0.5, parents, mates)
        child ^= rng.random((population, N)) < rate
        child[:2] = elite
        pop = _repair(child, cap, rng)
        fit = fitness(pop)
    best = pop[int(fit.argmax())]
    d, _ = best_for_set(inst, best, g)
    return d, {"B": d.B}
