"""Environment steps per second: metamap's vectorised task batches against a plain gymnasium loop.

The same tasks (20 goals / goal velocities), the same policy (Gaussian MLP 100-100, one torch
thread), the same number of steps. The plain loop runs one ``gymnasium.Env`` per episode and asks
the policy for one action at a time, as a straightforward gymnasium program would; metamap steps
all tasks x trajectories together and asks the policy once per time step. Medians of
``--repeats`` runs, measured side by side in one process.

    python benchmarks/rl_speed.py                      # 2-D navigation
    python benchmarks/rl_speed.py --family cheetah-velocity --trajectories 4
"""
from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from benchmarks.common import facts_line, median, save
from metamap.rl.envs import gym_env, make_family
from metamap.rl.maml import stream
from metamap.rl.policies import GaussianMLPPolicy
from metamap.rl.trajectories import rollout


def vectorised(family, policy, tasks, trajectories) -> float:
    params = {n: p.detach() for n, p in policy.named_parameters()}
    t0 = time.perf_counter()
    ep = rollout(family, lambda o: policy.distribution(params, o), tasks, trajectories,
                 [stream(0, "bench", 0, i, 0) for i in range(len(tasks))])
    return ep.mask.numel() / (time.perf_counter() - t0)


def plain_loop(family, policy, tasks, trajectories) -> float:
    params = {n: p.detach() for n, p in policy.named_parameters()}
    lo, hi = family.action_low, family.action_high
    rng = np.random.default_rng(0)
    steps = 0
    t0 = time.perf_counter()
    for i, task in enumerate(tasks):
        env = gym_env(family, task)
        for j in range(trajectories):
            obs, _ = env.reset(seed=1000 * i + j)
            for _ in range(family.horizon):
                with torch.no_grad():
                    mean, log_std = policy.distribution(params, torch.as_tensor(obs, dtype=torch.float32)[None, None])
                a = (mean + torch.exp(log_std) * torch.from_numpy(rng.standard_normal(family.act_dim)).float())[0, 0]
                action = np.clip(lo + (a.double().numpy() + 1) * 0.5 * (hi - lo), lo, hi)
                obs, _, terminated, truncated, _ = env.step(action)
                steps += 1
                if terminated or truncated:
                    break
    return steps / (time.perf_counter() - t0)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="navigation2d")
    p.add_argument("--tasks", type=int, default=20)
    p.add_argument("--trajectories", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    family = make_family(args.family)
    torch.manual_seed(0)
    policy = GaussianMLPPolicy(family.policy_obs_dim, family.act_dim)
    tasks = family.sample_tasks(np.random.default_rng(0), args.tasks)
    vec, loop = [], []
    for _ in range(args.repeats):
        vec.append(vectorised(family, policy, tasks, args.trajectories))
        loop.append(plain_loop(family, policy, tasks, args.trajectories))
    result = {"family": args.family, "tasks": args.tasks, "trajectories": args.trajectories,
              "horizon": family.horizon, "vectorised_steps_per_s": median(vec),
              "plain_gymnasium_steps_per_s": median(loop), "ratio": median(vec) / median(loop),
              "repeats": args.repeats, "command": "python benchmarks/rl_speed.py " + " ".join(argv or [])}
    print(facts_line())
    print(f"{args.family}: {args.tasks} tasks x {args.trajectories} trajectories x {family.horizon} steps, "
          f"policy MLP 100-100, 1 thread")
    print(f"  metamap vectorised: {result['vectorised_steps_per_s']:,.0f} env steps/s (median of {args.repeats})")
    print(f"  plain gymnasium loop: {result['plain_gymnasium_steps_per_s']:,.0f} env steps/s")
    print(f"  ratio: {result['ratio']:.1f}x")
    print(f"saved {save(f'rl_speed-{args.family}', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
