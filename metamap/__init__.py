"""metamap: meta-learning for PyTorch. Every learner maps a task's support set to a predictor."""
from metamap.algorithms.base import MetaLearner, Predictor
from metamap.errors import MetamapError
from metamap.tasks.batch import TaskBatch

__version__ = "0.1.0"
__all__ = ["MetaLearner", "Predictor", "TaskBatch", "MetamapError", "load", "__version__"]


def load(checkpoint, device: str = "cpu"):
    """Load a trained learner from a checkpoint folder (or a run folder: its best checkpoint).

    The learner comes in evaluation mode with ``learner.spec`` (the image preprocessing used in
    training, or ``None``) and ``learner.config`` attached::

        learner = metamap.load("runs/protonet-omniglot/best")
        predictor = learner.adapt(support_x, support_y)
        logits = predictor(query_x)
    """
    from metamap.train.checkpoint import load_learner
    return load_learner(checkpoint, device=device)
