"""Meta-reinforcement learning: task families on gymnasium's API, policies, MAML-TRPO, RL².

See :mod:`metamap.rl.envs` (task families), :mod:`metamap.rl.maml` (MAML-RL steps),
:mod:`metamap.rl.rl2` (RL²) and :mod:`metamap.rl.learners` (the learners the CLI trains).
"""
