"""Policies: a Gaussian MLP run with shared or per-task weights, any network as a Gaussian policy's
mean, and RL²'s recurrent policy.

Both output a diagonal Gaussian over *normalised* actions (``[-1, 1]`` maps onto the
environment's bounds, see :mod:`metamap.rl.envs`) with a state-independent learned log standard
deviation, initial standard deviation 1 (rllab's ``init_std``).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def gaussian_log_prob(mean: Tensor, log_std: Tensor, actions: Tensor) -> Tensor:
    """Log density of ``actions [..., act]`` under ``N(mean, exp(log_std)^2)``, summed over the last axis."""
    z = (actions - mean) * torch.exp(-log_std)
    return (-0.5 * z * z - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


def gaussian_kl(mean_p: Tensor, log_std_p: Tensor, mean_q: Tensor, log_std_q: Tensor) -> Tensor:
    """``KL(p || q)`` of two diagonal Gaussians, summed over the last axis."""
    var_p, var_q = torch.exp(2 * log_std_p), torch.exp(2 * log_std_q)
    return (log_std_q - log_std_p + (var_p + (mean_p - mean_q) ** 2) / (2 * var_q) - 0.5).sum(-1)


def gaussian_entropy(log_std: Tensor) -> Tensor:
    return (log_std + 0.5 * math.log(2 * math.pi * math.e)).sum(-1)


def _linear(h: Tensor, w: Tensor, b: Tensor) -> Tensor:
    """``h [T, B, in]`` through a weight shared by all tasks ``[out, in]`` or per task ``[T, out, in]``."""
    if w.dim() == 2:
        return h @ w.T + b
    return torch.baddbmm(b.unsqueeze(1), h, w.transpose(1, 2))


class GaussianMLPPolicy(nn.Module):
    """``obs [T, B, obs_dim]`` -> mean ``[T, B, act_dim]``, log std ``[T or 1, 1, act_dim]``.

    ``hidden`` layers with ``activation`` (ReLU as in the authors' code; Xavier-uniform weights,
    zero biases as in their TensorFlow layers). :meth:`distribution` takes a parameter dict
    whose entries are either shaped like the module's own parameters (shared by all tasks) or
    carry an extra leading task dimension (after an inner step each task has its own weights).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: tuple[int, ...] = (100, 100),
                 activation: str = "relu", init_std: float = 1.0):
        super().__init__()
        if activation not in ("relu", "tanh"):
            raise ValueError(f"activation must be relu or tanh, not {activation!r}")
        sizes = [obs_dim, *hidden, act_dim]
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        for layer in self.layers:
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))
        self.activation = torch.relu if activation == "relu" else torch.tanh
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def params(self) -> dict[str, Tensor]:
        return dict(self.named_parameters())

    def distribution(self, params: dict[str, Tensor], obs: Tensor) -> tuple[Tensor, Tensor]:
        h = obs
        last = len(self.layers) - 1
        for i in range(len(self.layers)):
            h = _linear(h, params[f"layers.{i}.weight"], params[f"layers.{i}.bias"])
            if i < last:
                h = self.activation(h)
        log_std = params["log_std"]
        log_std = log_std.unsqueeze(-2) if log_std.dim() == 2 else log_std.reshape(1, 1, -1)
        return h, log_std


class GaussianPolicy(nn.Module):
    """Any network as the mean of a diagonal Gaussian policy: ``mean(obs [..., obs_dim]) ->
    [..., act_dim]`` (a user's module), plus a learned state-independent log std.

    :meth:`distribution` has :class:`GaussianMLPPolicy`'s contract. Weights shared by all tasks
    run the network once; per-task weights (an extra leading task dimension, after an inner
    step) run it once per task through ``torch.func.functional_call``, so any ``nn.Module``
    works (the MLP's batched matrix products are its fast path).
    """

    def __init__(self, mean: nn.Module, obs_dim: int, act_dim: int, init_std: float = 1.0):
        super().__init__()
        self.mean = mean
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))
        self.obs_dim, self.act_dim = obs_dim, act_dim

    def params(self) -> dict[str, Tensor]:
        return dict(self.named_parameters())

    def distribution(self, params: dict[str, Tensor], obs: Tensor) -> tuple[Tensor, Tensor]:
        from torch.func import functional_call

        own = dict(self.mean.named_parameters())
        weights = {n.removeprefix("mean."): p for n, p in params.items() if n.startswith("mean.")}
        per_task = [n for n, p in weights.items() if p.dim() > own[n].dim()]
        if not per_task:
            mean = functional_call(self.mean, weights, (obs,))
        else:
            mean = torch.stack([functional_call(self.mean, {n: p[t] if n in per_task else p
                                                            for n, p in weights.items()}, (obs[t],))
                                for t in range(obs.shape[0])])
        log_std = params["log_std"]
        log_std = log_std.unsqueeze(-2) if log_std.dim() == 2 else log_std.reshape(1, 1, -1)
        return mean, log_std


class RecurrentPolicy(nn.Module):
    """RL²'s policy (Duan et al. 2016): a GRU over ``[obs, previous action, reward, done]``.

    The hidden state starts at zero when a task starts and is carried across the episodes of
    that task (the trial), so the policy can remember what earlier episodes revealed. Outputs a
    Gaussian over normalised actions and a value estimate (for PPO's advantages).
    """

    def __init__(self, obs_dim: int, act_dim: int, hidden: int = 64, init_std: float = 1.0,
                 separate_value: bool = True):
        super().__init__()
        self.obs_dim, self.act_dim, self.hidden = obs_dim, act_dim, hidden
        self.gru = nn.GRU(obs_dim + act_dim + 2, hidden, batch_first=True)
        # A value GRU of its own: returns here are tens of units, the policy's gradients a few
        # hundredths, and a shared GRU was trained almost only by the value loss.
        self.value_gru = nn.GRU(obs_dim + act_dim + 2, hidden, batch_first=True) if separate_value else None
        self.mean = nn.Linear(hidden, act_dim)
        self.value = nn.Linear(hidden, 1)
        nn.init.xavier_uniform_(self.mean.weight, gain=0.1)
        nn.init.zeros_(self.mean.bias)
        self.log_std = nn.Parameter(torch.full((act_dim,), math.log(init_std)))

    @staticmethod
    def inputs(obs: Tensor, prev_action: Tensor, prev_reward: Tensor, prev_done: Tensor) -> Tensor:
        """``[..., obs + act + 2]``: what the GRU reads at one step."""
        return torch.cat([obs, prev_action, prev_reward.unsqueeze(-1), prev_done.unsqueeze(-1)], -1)

    def initial_state(self, batch: int, dtype=torch.float32) -> Tensor:
        """The zero state ``[1, B, hidden]`` (``2 hidden`` with a separate value GRU)."""
        return torch.zeros(1, batch, self.hidden * (2 if self.value_gru is not None else 1), dtype=dtype)

    def forward(self, x: Tensor, state: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``x [B, L, in]``, ``state`` (see :meth:`initial_state`) -> mean ``[B, L, act]``, log std
        ``[act]``, value ``[B, L]``, final state."""
        if self.value_gru is None:
            out, state = self.gru(x, state)
            return self.mean(out), self.log_std, self.value(out).squeeze(-1), state
        h_pi, h_v = state.split(self.hidden, -1)
        out, h_pi = self.gru(x, h_pi.contiguous())
        out_v, h_v = self.value_gru(x, h_v.contiguous())
        return self.mean(out), self.log_std, self.value(out_v).squeeze(-1), torch.cat([h_pi, h_v], -1)
