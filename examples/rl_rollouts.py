"""Parallel rollouts and a parameter server: evolution strategies on CartPole (numpy only).

    tessera up && python examples/rl_rollouts.py [--workers 4] [--target 195]

The Ray paper's motivating workload. Rollout actors each own a simulated
environment; every iteration they evaluate antithetic perturbations of the
current policy (fetched from the parameter-server actor) and return returns;
the parameter server turns them into a gradient estimate and updates the policy.
Training stops when the policy balances the pole for ``--target`` steps on
average. ``run()`` is also the task-and-actor step of ``examples/demo.py``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np

import tessera


class CartPole:
    """The classic cart-pole balance task (Barto et al. 1983), as in Gym's CartPole-v1."""

    GRAVITY, CART, POLE, HALF_LEN, FORCE, DT = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02

    def __init__(self, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.state = np.zeros(4)

    def reset(self) -> np.ndarray:
        self.state = self.rng.uniform(-0.05, 0.05, 4)
        return self.state

    def step(self, action: int) -> tuple[np.ndarray, bool]:
        x, v, th, w = self.state
        force = self.FORCE if action else -self.FORCE
        total = self.CART + self.POLE
        ml = self.POLE * self.HALF_LEN
        tmp = (force + ml * w * w * np.sin(th)) / total
        acc_th = (self.GRAVITY * np.sin(th) - np.cos(th) * tmp) / (
            self.HALF_LEN * (4.0 / 3.0 - self.POLE * np.cos(th) ** 2 / total))
        acc_x = tmp - ml * acc_th * np.cos(th) / total
        self.state = np.array([x + self.DT * v, v + self.DT * acc_x, th + self.DT * w, w + self.DT * acc_th])
        done = abs(self.state[0]) > 2.4 or abs(self.state[2]) > 12 * np.pi / 180
        return self.state, bool(done)


def episode(env: CartPole, theta: np.ndarray, max_steps: int) -> float:
    obs = env.reset()
    for t in range(max_steps):
        obs, done = env.step(int(obs @ theta[:4] + theta[4] > 0))
        if done:
            return float(t + 1)
    return float(max_steps)


@tessera.remote
class ParameterServer:
    """Holds the policy; turns perturbation returns into an update (rank-normalized ES gradient)."""

    def __init__(self, dim: int, lr: float, sigma: float) -> None:
        self.theta = np.zeros(dim)
        self.lr, self.sigma = lr, sigma
        self.version = 0

    def get(self) -> tuple[int, np.ndarray]:
        return self.version, self.theta

    def update(self, *results: list[tuple[int, float, float]]) -> int:
        flat = [r for batch in results for r in batch]
        seeds = np.array([s for s, _, _ in flat])
        diffs = np.array([p - m for _, p, m in flat])
        if np.all(diffs == 0):
            return self.version
        ranks = np.argsort(np.argsort(diffs)) / max(1, len(diffs) - 1) - 0.5  # robust to the reward scale
        grad = np.zeros_like(self.theta)
        for seed, r in zip(seeds, ranks, strict=True):
            grad += r * np.random.default_rng(int(seed)).standard_normal(self.theta.size)
        self.theta = self.theta + self.lr / (len(flat) * self.sigma) * grad
        self.version += 1
        return self.version


@tessera.remote
class RolloutWorker:
    """One simulated environment; evaluates perturbed policies."""

    def __init__(self, worker: int, sigma: float, max_steps: int) -> None:
        self.env = CartPole(seed=1000 + worker)
        self.worker, self.sigma, self.max_steps = worker, sigma, max_steps

    def rollouts(self, theta: np.ndarray, iteration: int, pairs: int) -> list[tuple[int, float, float]]:
        out = []
        for k in range(pairs):
            seed = (iteration * 1_000 + self.worker) * 100 + k
            eps = np.random.default_rng(seed).standard_normal(theta.size) * self.sigma
            out.append((seed, episode(self.env, theta + eps, self.max_steps), episode(self.env, theta - eps, self.max_steps)))
        return out

    def evaluate(self, theta: np.ndarray, episodes: int) -> float:
        return float(np.mean([episode(self.env, theta, self.max_steps) for _ in range(episodes)]))


def train(*, workers: int = 4, pairs: int = 4, target: float = 195.0, max_iters: int = 60, max_steps: int = 200,
          log: Any = print) -> dict[str, Any]:
    """Train until the mean evaluation return reaches ``target``; returns a summary."""
    t0 = time.perf_counter()
    ps = ParameterServer.remote(5, 0.5, 0.1)
    rollers = [RolloutWorker.remote(i, 0.1, max_steps) for i in range(workers)]
    score, it = 0.0, 0
    for it in range(1, max_iters + 1):
        _, theta = tessera.get(ps.get.remote())
        theta_ref = tessera.put(theta)  # one copy in the object store, read by every worker
        batches = [w.rollouts.remote(theta_ref, it, pairs) for w in rollers]
        tessera.get(ps.update.remote(*batches))  # refs as arguments: the server gets the workers' results
        if it % 2 == 0 or it == 1:
            _, theta = tessera.get(ps.get.remote())
            score = float(np.mean(tessera.get([w.evaluate.remote(theta, 2) for w in rollers])))
            log(f"   iteration {it:3d}: mean return {score:6.1f}")
            if score >= target:
                break
    for a in [ps, *rollers]:
        tessera.kill(a)
    return {"iterations": it, "score": score, "seconds": time.perf_counter() - t0, "rollouts": it * workers * pairs * 2}


def run(print_row: Any = print) -> dict[str, Any]:
    """The demo step: tasks fan out, actors train; returns what the summary table shows."""

    @tessera.remote
    def square(x: int) -> int:
        return x * x

    t = time.perf_counter()
    squares = tessera.get([square.remote(i) for i in range(100)])
    assert squares == [i * i for i in range(100)]
    tasks_s = time.perf_counter() - t
    summary = train(log=print_row)
    summary["tasks_s"] = tasks_s
    return summary


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--pairs", type=int, default=4, help="antithetic perturbation pairs per worker per iteration")
    ap.add_argument("--target", type=float, default=195.0)
    args = ap.parse_args()
    tessera.init(name="rl-rollouts")
    try:
        s = train(workers=args.workers, pairs=args.pairs, target=args.target)
    finally:
        tessera.shutdown()
    ok = s["score"] >= args.target
    print(f"{'reached' if ok else 'did not reach'} {args.target:g} in {s['iterations']} iterations, "
          f"{s['rollouts']} rollouts, {s['seconds']:.1f}s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
