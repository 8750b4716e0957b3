"""Task families for meta-reinforcement learning, vectorised over tasks x trajectories.

A *task family* draws tasks (one parameter vector each) and builds a batch of environments
running ``trajectories`` copies of each of ``T`` tasks at once::

    family = Navigation2D()
    tasks = family.sample_tasks(np.random.default_rng(0), 20)          # [T, 2] goals
    env = family.make(tasks, trajectories=20, seed=0)
    obs = env.reset()                                                  # [T, N, obs_dim]
    obs, reward, done = env.step(actions)                              # actions [T, N, act_dim]

Actions are given in the policy's normalised units, ``[-1, 1]`` per coordinate, and rescaled to
the environment's bounds (then clipped), as the authors' code did with rllab's ``normalize``.
``done`` marks a terminated trajectory; its later rewards are zero and the sampler masks them.
Every random choice (task draws, initial states) flows from the seeds given, so the same seed
gives the same tasks, rollouts and returns.

* :class:`Navigation2D` (Finn et al. 2017, section 5.3, and the authors' code): a point in the
  plane starting at the origin, goal ``U[-0.5, 0.5]^2`` per task, observation = position,
  velocity actions clipped to ``[-0.1, 0.1]``, reward = minus the distance to the goal, horizon
  100, termination within 0.01 of the goal in both coordinates. Pure NumPy.
* :class:`HalfCheetahVelocity` (goal velocity ``U[0, 2]``) and :class:`HalfCheetahDirection`
  (forward or backward) wrap gymnasium's MuJoCo ``HalfCheetah-v5`` (the ``metamap[rl]`` extra),
  with the authors' task rewards: ``-|v - v_goal| - 0.05 |a|^2`` and ``d v - 0.05 |a|^2``,
  horizon 200.

``oracle=True`` appends the task's parameters to the observation (the oracle baseline).
"""
from __future__ import annotations

import warnings

import numpy as np

from metamap.errors import ConfigError, MetamapError


class VecEnv:
    """``T`` tasks x ``N`` trajectories stepped together; see the module docstring."""

    obs_dim: int
    act_dim: int

    def reset(self) -> np.ndarray:
        raise NotImplementedError

    def step(self, actions: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        raise NotImplementedError


class TaskFamily:
    """A distribution over tasks plus the vectorised environments that run them."""

    name: str = ""
    obs_dim: int = 0
    act_dim: int = 0
    task_dim: int = 0
    horizon: int = 100
    action_low: float = -1.0
    action_high: float = 1.0

    def __init__(self, oracle: bool = False, horizon: int | None = None):
        self.oracle = bool(oracle)
        if horizon is not None:
            if isinstance(horizon, bool) or not isinstance(horizon, int) or horizon < 1:
                raise ConfigError(f"data.horizon must be a whole number >= 1, not {horizon!r}")
            self.horizon = horizon

    @property
    def policy_obs_dim(self) -> int:
        """What the policy sees: the observation, plus the task's parameters for an oracle."""
        return self.obs_dim + (self.task_dim if self.oracle else 0)

    def sample_tasks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``[n, task_dim]`` task parameters."""
        raise NotImplementedError

    def make(self, tasks: np.ndarray, trajectories: int, seed: int) -> VecEnv:
        raise NotImplementedError

    def scale_actions(self, actions: np.ndarray) -> np.ndarray:
        """Normalised ``[-1, 1]`` actions -> the environment's bounds, clipped (rllab's ``normalize``)."""
        lo, hi = self.action_low, self.action_high
        return np.clip(lo + (actions + 1.0) * 0.5 * (hi - lo), lo, hi)

    def describe_task(self, task: np.ndarray) -> str:
        return ", ".join(f"{v:.3f}" for v in task)


class _OracleObs(VecEnv):
    """Appends each task's parameters to its observations."""

    def __init__(self, env: VecEnv, tasks: np.ndarray, trajectories: int):
        self.env = env
        self.extra = np.broadcast_to(tasks[:, None, :], (len(tasks), trajectories, tasks.shape[1]))
        self.obs_dim, self.act_dim = env.obs_dim + tasks.shape[1], env.act_dim

    def reset(self) -> np.ndarray:
        return np.concatenate([self.env.reset(), self.extra], -1)

    def step(self, actions):
        obs, reward, done = self.env.step(actions)
        return np.concatenate([obs, self.extra], -1), reward, done


# -- 2-D navigation ------------------------------------------------------------------------------
class NavigationVecEnv(VecEnv):
    obs_dim = act_dim = 2

    def __init__(self, family: Navigation2D, goals: np.ndarray, trajectories: int):
        self.family, self.goals = family, np.asarray(goals, dtype=np.float64)
        self.shape = (len(goals), trajectories)
        self.position = np.zeros((*self.shape, 2))
        self.terminated = np.zeros(self.shape, dtype=bool)

    def reset(self) -> np.ndarray:
        self.position = np.zeros((*self.shape, 2))
        self.terminated = np.zeros(self.shape, dtype=bool)
        return self.position.copy()

    def step(self, actions: np.ndarray):
        move = self.family.scale_actions(np.asarray(actions, dtype=np.float64))
        # Terminated trajectories stand still and earn nothing (the sampler masks them anyway).
        self.position = self.position + np.where(self.terminated[..., None], 0.0, move)
        delta = self.position - self.goals[:, None, :]
        reward = np.where(self.terminated, 0.0, -np.sqrt((delta ** 2).sum(-1)))
        radius = self.family.goal_radius
        self.terminated = self.terminated | (np.abs(delta) < radius).all(-1) if radius > 0 else self.terminated
        return self.position.copy(), reward, self.terminated.copy()


class Navigation2D(TaskFamily):
    """2-D point navigation to a goal drawn per task (see the module docstring)."""

    name = "navigation2d"
    obs_dim = act_dim = task_dim = 2
    horizon = 100
    action_low, action_high = -0.1, 0.1

    def __init__(self, oracle: bool = False, horizon: int | None = None, goal_low: float = -0.5,
                 goal_high: float = 0.5, goal_radius: float = 0.01):
        super().__init__(oracle, horizon)
        if not goal_low < goal_high:
            raise ConfigError(f"navigation goal range [{goal_low}, {goal_high}] is empty")
        self.goal_low, self.goal_high, self.goal_radius = float(goal_low), float(goal_high), float(goal_radius)

    def sample_tasks(self, rng: np.random.Generator, n: int) -> np.ndarray:
        return rng.uniform(self.goal_low, self.goal_high, size=(n, 2))

    def make(self, tasks: np.ndarray, trajectories: int, seed: int) -> VecEnv:
        # No randomness in the dynamics: every trajectory starts at the origin.
        env = NavigationVecEnv(self, tasks, trajectories)
        return _OracleObs(env, tasks, trajectories) if self.oracle else env

    def describe_task(self, task: np.ndarray) -> str:
        return f"goal ({task[0]:+.3f}, {task[1]:+.3f})"


# -- half-cheetah -------------------------------------------------------------------------------
def _mujoco_warning(message: str) -> None:
    # gymnasium's half_cheetah.xml still uses a compiler attribute MuJoCo 3 deprecates; that one is
    # harmless. Without a handler MuJoCo appends every warning to MUJOCO_LOG.TXT in the working folder.
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message.strip()}", stacklevel=2)


def require_mujoco():
    """gymnasium with MuJoCo, or a clear error saying how to install it."""
    try:
        import gymnasium
        import mujoco
    except ImportError as e:
        raise MetamapError(f"the half-cheetah tasks need gymnasium with MuJoCo ({e}); install them with "
                           "pip install 'metamap[rl]'") from None
    mujoco.set_mju_user_warning(_mujoco_warning)
    return gymnasium


class CheetahVecEnv(VecEnv):
    """One gymnasium ``HalfCheetah-v5`` per (task, trajectory); the task's reward replaces the default."""

    obs_dim, act_dim = 17, 6

    def __init__(self, family: HalfCheetahTasks, tasks: np.ndarray, trajectories: int, seed: int):
        gymnasium = require_mujoco()
        self.family, self.tasks = family, np.asarray(tasks, dtype=np.float64)
        self.shape = (len(tasks), trajectories)
        self.envs = [gymnasium.make("HalfCheetah-v5", max_episode_steps=None).unwrapped
                     for _ in range(self.shape[0] * self.shape[1])]
        # One seed per (task, trajectory), derived from the batch's seed: initial-state noise.
        self.seeds = np.random.SeedSequence(seed).generate_state(len(self.envs)).tolist()

    def reset(self) -> np.ndarray:
        obs = [env.reset(seed=int(s))[0] for env, s in zip(self.envs, self.seeds)]
        return np.stack(obs).reshape(*self.shape, -1)

    def step(self, actions: np.ndarray):
        a = self.family.scale_actions(np.asarray(actions, dtype=np.float64)).reshape(-1, self.act_dim)
        obs, vel = [], []
        for env, act in zip(self.envs, a):
            o, _, _, _, info = env.step(act)
            obs.append(o)
            vel.append(info["x_velocity"])
        velocity = np.asarray(vel).reshape(self.shape)
        ctrl = 0.5 * 1e-1 * (a.reshape(*self.shape, -1) ** 2).sum(-1)
        reward = self.family.task_reward(velocity, self.tasks[:, :1]) - ctrl
        return np.stack(obs).reshape(*self.shape, -1), reward, np.zeros(self.shape, dtype=bool)


class HalfCheetahTasks(TaskFamily):
    obs_dim, act_dim, task_dim = 17, 6, 1
    horizon = 200

    def make(self, tasks: np.ndarray, trajectories: int, seed: int) -> VecEnv:
        env = CheetahVecEnv(self, tasks, trajectories, seed)
        return _OracleObs(env, tasks, trajectories) if self.oracle else env

    def task_reward(self, velocity: np.ndarray, task: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class HalfCheetahVelocity(HalfCheetahTasks):
    """Run at a goal velocity ``U[0, 2]``: reward ``-|v - v_goal|`` minus the control cost."""

    name = "cheetah-velocity"

    def sample_tasks(self, rng, n):
        return rng.uniform(0.0, 2.0, size=(n, 1))

    def task_reward(self, velocity, task):
        return -np.abs(velocity - task)

    def describe_task(self, task):
        return f"goal velocity {task[0]:.3f}"


class HalfCheetahDirection(HalfCheetahTasks):
    """Run forward (+1) or backward (-1), each with probability 1/2: reward ``d v`` minus the control cost."""

    name = "cheetah-direction"

    def sample_tasks(self, rng, n):
        return np.where(rng.uniform(size=(n, 1)) < 0.5, -1.0, 1.0)

    def task_reward(self, velocity, task):
        return task * velocity

    def describe_task(self, task):
        return "forward" if task[0] > 0 else "backward"


FAMILIES = {"navigation2d": Navigation2D, "cheetah-velocity": HalfCheetahVelocity,
            "cheetah-direction": HalfCheetahDirection}


def make_family(name: str, **options) -> TaskFamily:
    if name not in FAMILIES:
        raise ConfigError(f"unknown RL task family {name!r}; choose one of {', '.join(FAMILIES)}")
    return FAMILIES[name](**options)


# -- gymnasium's single-environment API ------------------------------------------------------------
def gym_env(family: TaskFamily, task: np.ndarray):
    """One task as a ``gymnasium.Env`` (for use with other gymnasium tools).

    Actions are in the environment's own units (for 2-D navigation ``[-0.1, 0.1]^2``);
    ``reset(seed=...)`` seeds the initial state; the episode is truncated at the horizon.
    """
    import gymnasium
    from gymnasium import spaces

    task = np.asarray(task, dtype=np.float64)
    lo, hi = family.action_low, family.action_high

    class TaskEnv(gymnasium.Env):
        metadata = {"render_modes": []}

        def __init__(self):
            self.observation_space = spaces.Box(-np.inf, np.inf, (family.policy_obs_dim,), np.float64)
            self.action_space = spaces.Box(lo, hi, (family.act_dim,), np.float64)
            self.vec, self.t = None, 0

        def reset(self, *, seed=None, options=None):
            super().reset(seed=seed)
            self.vec = family.make(task[None], 1, 0 if seed is None else int(seed))
            self.t = 0
            return self.vec.reset()[0, 0], {}

        def step(self, action):
            normalised = (np.asarray(action, dtype=np.float64) - lo) / (0.5 * (hi - lo)) - 1.0
            obs, reward, done = self.vec.step(normalised[None, None])
            self.t += 1
            return obs[0, 0], float(reward[0, 0]), bool(done[0, 0]), self.t >= family.horizon, {}

    return TaskEnv()
