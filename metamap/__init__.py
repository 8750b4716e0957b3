"""metamap: meta-learning for PyTorch. Every learner maps a task's support set to a predictor."""
from metamap.algorithms.base import MetaLearner, Predictor
from metamap.errors import MetamapError
from metamap.tasks.batch import TaskBatch
from metamap import api
from metamap.api import (ANIL, FOMAML, FOMAMLTRPO, MAML, MAMLTRPO, MANN, RL2, FineTune, MAMLProMP, MatchingNet,
                         MetaSGD, Oracle, Pretrained, ProtoNet, RandomInit, RelationNet, Reptile, Siamese, build,
                         evaluate, fit)
from metamap.train.callbacks import Callback, EarlyStopping, JsonLinesLogger, LearningRateMonitor, TensorBoardLogger

__version__ = "0.1.0"
__all__ = ["MetaLearner", "Predictor", "TaskBatch", "MetamapError", "load", "__version__",
           "MAML", "FOMAML", "MetaSGD", "Reptile", "ANIL", "ProtoNet", "MatchingNet", "Siamese", "RelationNet",
           "FineTune", "MANN", "MAMLTRPO", "FOMAMLTRPO", "MAMLProMP", "Pretrained", "RandomInit", "Oracle", "RL2",
           "build", "fit", "evaluate", "Callback", "EarlyStopping", "JsonLinesLogger",
           "LearningRateMonitor", "TensorBoardLogger"]


def load(checkpoint, device: str = "cpu", learner=None):
    """Load a trained learner from a checkpoint folder (or a run folder: its best checkpoint).

    Returns a :class:`~metamap.train.checkpoint.LoadedLearner`: ``.learner`` (in evaluation
    mode), ``.spec`` (the image preprocessing used in training, or ``None``), ``.config``::

        model = metamap.load("runs/protonet-omniglot/best")
        predictor = model.learner.adapt(support_x, support_y)
        logits = predictor(query_x)

    ``learner``: a learner built in Python (e.g. ``metamap.MAML(my_cnn)``) to load the weights
    into, for checkpoints of learners around one's own modules.
    """
    from metamap.train.checkpoint import load_learner
    return load_learner(checkpoint, device=device, learner=learner)
