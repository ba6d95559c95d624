"""The pieces of the demo's story: a CartPole policy learned from an expert's rollouts.

- :class:`ExpertRollouts`: an actor that owns a simulated cart-pole (examples/rl_rollouts.py)
  and plays it with a hand-tuned controller, now and then taking a random action so that the
  states it visits are varied; every state it saw is labelled with the expert's action.
- :func:`train`: the GPU job. It reads the dataset from the object store by id, trains a small
  MLP to imitate the expert through the :mod:`tessera.gpu` hook (a mini-batch boundary per step,
  a checkpoint every ``checkpoint_every`` mini-batches that the node agent copies into the object
  store), and reports how long the learned policy balances the pole.
"""

from __future__ import annotations

import time
from typing import Any

import cloudpickle
import numpy as np
import rl_rollouts
from rl_rollouts import CartPole

import tessera

# task workers cannot import this folder: the simulator travels with the actor, by value
cloudpickle.register_pickle_by_value(rl_rollouts)

EXPERT = np.array([0.1, 0.5, 10.0, 1.0])  # push right when 0.1 x + 0.5 v + 10 theta + omega > 0
FIELDS = ("x", "v", "theta", "omega")
ACTIONS = ("left", "right")
MAX_STEPS = 500


def expert_action(obs: np.ndarray) -> int:
    return int(obs @ EXPERT > 0)


@tessera.remote
class ExpertRollouts:
    """One simulated cart-pole played by the expert with some random actions mixed in."""

    def __init__(self, worker: int, explore: float) -> None:
        self.env = CartPole(seed=2000 + worker)
        self.rng = np.random.default_rng(worker)
        self.explore = explore

    def collect(self, episodes: int, max_steps: int = 200) -> tuple[np.ndarray, np.ndarray]:
        """``episodes`` episodes; returns the states seen (float32, n x 4) and the expert's actions (int64)."""
        states, actions = [], []
        for _ in range(episodes):
            obs = self.env.reset()
            for _ in range(max_steps):
                states.append(obs.astype(np.float32))
                actions.append(expert_action(obs))
                act = int(self.rng.integers(2)) if self.rng.random() < self.explore else actions[-1]
                obs, done = self.env.step(act)
                if done:
                    break
        return np.stack(states), np.array(actions, dtype=np.int64)


@tessera.remote
def merge(*parts: tuple[np.ndarray, np.ndarray]) -> dict[str, np.ndarray]:
    """The rollouts of every actor as one dataset: ``obs`` (n x 4) and ``action`` (n)."""
    return {"obs": np.concatenate([p[0] for p in parts]), "action": np.concatenate([p[1] for p in parts])}


def policy_model(seed: int = 0) -> Any:
    import torch

    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(4, 32), torch.nn.ReLU(), torch.nn.Linear(32, 2))


def balance(model: Any, episodes: int = 3, seed: int = 7) -> float:
    """Mean number of steps (of MAX_STEPS) the policy keeps the pole up."""
    import torch

    env, total = CartPole(seed), 0.0
    with torch.no_grad():
        for _ in range(episodes):
            obs = env.reset()
            for _ in range(MAX_STEPS):
                act = int(model(torch.as_tensor(obs, dtype=torch.float32)[None]).argmax(1))
                obs, done = env.step(act)
                total += 1
                if done:
                    break
    return total / episodes


def train(dataset_id: str, steps: str = "300", lr: str = "0.01", seed: str = "0", sleep_s: str = "0.0",
          checkpoint_every: str = "50") -> None:
    """The GPU job: imitate the expert on the dataset object ``dataset_id`` (hex)."""
    import torch

    from tessera import gpu
    from tessera.client.objects import local_object_store_address

    with tessera.ObjectStoreClient(local_object_store_address()) as store:
        data = store.get(tessera.ObjectRef(bytes.fromhex(dataset_id)), timeout=60)
        obs, action = torch.tensor(np.array(data["obs"])), torch.tensor(np.array(data["action"]))
        del data
    torch.set_num_threads(1)  # a model this small gains nothing from more threads on a shared host
    model = policy_model(int(seed))
    opt = torch.optim.Adam(model.parameters(), lr=float(lr))
    job = gpu.init(model, opt, checkpoint_every=int(checkpoint_every))
    start = job.restore()
    loss_fn = torch.nn.CrossEntropyLoss()
    for step in range(start, int(steps)):
        idx = torch.from_numpy(np.random.default_rng(step).integers(0, len(obs), 256))
        opt.zero_grad()
        logits = model(obs[idx])
        loss = loss_fn(logits, action[idx])
        loss.backward()
        opt.step()
        if float(sleep_s):
            time.sleep(float(sleep_s))  # a heavier model's mini-batch time, so that time slices show
        job.step(loss=loss.item(), accuracy=float((logits.argmax(1) == action[idx]).float().mean()))
    with torch.no_grad():
        accuracy = float((model(obs).argmax(1) == action).float().mean())
    job.finish(accuracy=accuracy, balance=balance(model))
