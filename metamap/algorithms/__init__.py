"""Meta-learning algorithms. Each module registers its learner(s) with ``register_learner``."""
from metamap.algorithms.base import MetaLearner, Predictor

__all__ = ["MetaLearner", "Predictor"]
