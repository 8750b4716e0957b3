"""The one functional inner loop shared by MAML, first-order MAML, Reptile, ANIL and Meta-SGD.

Parameters travel as a dict ``name -> tensor``. A tensor shaped like the module's parameter is
*shared* by all tasks; one with an extra leading ``T`` dimension belongs to each task. The loop
starts from the shared initial weights ``theta``, expands the adapted ones to ``[T, ...]``
(a view: no copy) and takes ``k`` gradient steps on the sum of the per-task support losses --
since tasks do not interact, the gradient of that sum with respect to task ``t``'s copy is
exactly task ``t``'s own gradient.

Forward passes go through a backend (:mod:`metamap.nets.backend`): the fast one runs all tasks
at once (grouped convolutions) for networks that lower to its operations, the reference one is
a per-task loop over ``torch.func.functional_call``; both compute the same function.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from metamap.algorithms.inner_opt import InnerOptimizer
from metamap.algorithms.seeding import content_generator
from metamap.tasks.kinds import infer_kind


def task_losses(outputs: Tensor, targets: Tensor) -> Tensor:
    """``[T]`` per-task mean loss of bare labelled tensors: cross-entropy for class labels,
    squared error for real targets (see :func:`metamap.tasks.kinds.infer_kind`)."""
    return infer_kind(targets).loss(outputs, targets)


def minibatch_indices(support_x: Tensor, batch: int, steps: int, seed: int) -> Tensor:
    """``[steps, T, batch]`` positions of the support examples each inner step uses.

    As in Reptile's code: each task's examples are shuffled and dealt out ``batch`` at a time,
    reshuffled whenever they run out (a batch may straddle two shuffles). The order of task
    ``t`` is drawn from ``seed`` and task ``t``'s own support set, so it does not depend on the
    other tasks of the meta-batch, on chunking or on the number of ranks.
    """
    t, s = support_x.shape[:2]
    rounds = -(-batch * steps // s)
    orders = []
    for i in range(t):
        g = content_generator(seed, support_x[i])
        orders.append(torch.cat([torch.randperm(s, generator=g) for _ in range(rounds)])[:batch * steps])
    return torch.stack(orders).reshape(t, steps, batch).transpose(0, 1).to(support_x.device)


def inner_loop(forward: Callable[[dict[str, Tensor], Tensor], Tensor], theta: dict[str, Tensor],
               adapt: list[str], x: Tensor, y: Tensor, steps: int, optimizer: InnerOptimizer,
               differentiable: bool, second_order: bool, recompute: bool = False,
               loss: Callable[[Tensor, Tensor], Tensor] = task_losses,
               batches: Tensor | None = None,
               on_done: Callable[[tuple[Tensor, ...]], None] | None = None) -> list[dict[str, Tensor]]:
    """Adapt ``theta`` to each task of ``(x [T, S, ...], y [T, S])`` in ``steps`` inner steps.

    Returns the parameter dicts after ``0..steps`` steps: entries named in ``adapt`` are
    per-task ``[T, *shape]``, the others are ``theta``'s shared tensors.

    ``optimizer`` turns each step's gradients into new weights (plain SGD, learned step sizes,
    Adam: :mod:`metamap.algorithms.inner_opt`); ``loss`` maps ``(outputs, targets)`` to per-task
    losses ``[T]`` (the task kind's adaptation loss); ``batches [steps, T, B]``, if given, are the
    support positions each step uses (inner mini-batches), else every step uses all of them;
    ``on_done``, if given, receives the optimizer's final state (to carry it to the next tasks).

    ``differentiable``: keep the graph from ``theta`` (and learned step sizes) to the adapted
    weights, for a meta-gradient; ``second_order``: also differentiate through the inner
    gradients (MAML) rather than treat them as constants (first-order MAML, Reptile).
    At evaluation (``differentiable=False``) nothing is kept, whatever ``second_order`` says.

    A parameter that the support loss does not reach gets no gradient (stays unchanged).

    ``recompute``: gradient checkpointing. Each inner step keeps only its input and output
    weights; its activations (and the graph of its inner gradient) are recomputed during the
    meta-backward pass. Memory then stays that of one step however many steps are taken, for
    about one more forward-and-inner-backward per step. The meta-gradient is the same.
    """
    t = x.shape[0]
    with torch.enable_grad():
        fast = dict(theta)
        for n in fast if not differentiable else adapt:
            # At evaluation, cut every link to theta; a frozen weight (requires_grad=False) that
            # is adapted still needs a gradient in the inner loop, so it becomes a fresh leaf.
            if not differentiable or not fast[n].requires_grad:
                fast[n] = fast[n].detach().requires_grad_(n in adapt)
        # expand: a view, so the first step costs no copy; grads w.r.t. it come out per task.
        fast.update({n: fast[n].expand(t, *fast[n].shape) for n in adapt})
        with torch.set_grad_enabled(differentiable):
            state = optimizer.init({n: fast[n] for n in adapt})
        history = [fast]
        create_graph = differentiable and second_order
        for k in range(steps):
            xk, yk = (x, y) if batches is None else (_rows(x, batches[k]), _rows(y, batches[k]))

            def step(*tensors: Tensor, k: int = k, fast: dict[str, Tensor] = fast, xk=xk, yk=yk
                     ) -> tuple[Tensor, ...]:
                adapted, state = dict(zip(adapt, tensors)), tensors[len(adapt):]
                current = {**fast, **adapted}
                total = loss(forward(current, xk), yk).sum()
                grads = torch.autograd.grad(total, tuple(adapted.values()), create_graph=create_graph,
                                            allow_unused=True)
                grads = dict(zip(adapt, grads))
                if not differentiable:
                    with torch.no_grad():
                        new, state = optimizer.step(adapted, grads, state, k)
                    new = {n: w if w is adapted[n] else w.requires_grad_() for n, w in new.items()}
                else:
                    new, state = optimizer.step(adapted, grads, state, k)
                return tuple(new[n] for n in adapt) + tuple(state)

            inputs = [fast[n] for n in adapt] + list(state)
            if recompute and differentiable:
                # Non-reentrant checkpointing: it supports the inner autograd.grad and reaches
                # tensors the step closes over (learned step sizes, weights that do not adapt).
                out = checkpoint(step, *inputs, use_reentrant=False)
            else:
                out = step(*inputs)
            fast = {**fast, **dict(zip(adapt, out[:len(adapt)]))}
            state = tuple(out[len(adapt):])
            history.append(fast)
    if on_done is not None:
        on_done(state)
    return history


def _rows(v: Tensor, index: Tensor) -> Tensor:
    """``v [T, S, ...]``, ``index [T, B]`` -> ``[T, B, ...]``: each task's chosen examples."""
    return v.gather(1, index.reshape(*index.shape, *([1] * (v.dim() - 2))).expand(*index.shape, *v.shape[2:]))
