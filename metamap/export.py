"""A standalone few-shot classifier: a checkpoint adapted to a support folder, as one ONNX file.

``metamap export --checkpoint C --support DIR --out classifier.onnx`` adapts the learner of ``C``
to the classes of ``DIR`` (one sub-folder per class, as for ``metamap predict``) and writes the
resulting predictor with everything the adaptation produced baked in as constants: the
prototypes or support embeddings of metric learners, the fitted head of the fine-tuning
baseline, the adapted weights of gradient-based learners. It runs anywhere ONNX Runtime does,
without Python or metamap.

The model
---------
* input ``image``: ``uint8 [N, C, S, S]``, images already decoded and resized as the training
  images were (the ``preprocessing`` metadata: ``size`` S, ``channels`` C (1 grey, 3 RGB),
  ``invert``, the ``resample`` filter; :meth:`metamap.data.images.ImageSpec.load` does exactly
  this). Scaling to [0, 1] and the per-channel normalisation by ``mean`` and ``std`` happen
  inside the model.
* outputs ``logits`` ``float32 [N, ways]`` and ``probabilities`` (their softmax), one column per
  class in the order of the ``class_names`` metadata (the support folder's sub-folders, sorted).
* metadata (``metadata_props``): ``class_names`` and ``preprocessing`` (JSON), ``learner``,
  ``checkpoint``, ``metamap_version``, ``input``.

Learners whose adaptation normalises with the statistics of the query batch (gradient learners
with ``bn = "transductive"``, as MAML's reference code) keep doing so in the exported model, so
their outputs depend on which images are given together, as in ``metamap predict``.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import torch
from torch import Tensor, nn

from metamap.errors import ConfigError, DataError, MetamapError

INPUT, OUTPUTS = "image", ("logits", "probabilities")
INPUT_DOC = ("uint8 [N, C, S, S]: images decoded and resized as the preprocessing metadata says "
             "(mode, size, invert, resample); the model scales and normalises them")


def needs_export_extra():
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        raise ConfigError("ONNX export needs the onnx and onnxruntime packages: pip install 'metamap[export]'") \
            from None


class AdaptedClassifier(nn.Module):
    """``uint8 images [N, C, S, S]`` -> ``(logits, probabilities)`` ``[N, ways]`` of a learner
    adapted to one support set; the adaptation's results are constants of the predictor."""

    def __init__(self, learner: nn.Module, predictor, spec):
        super().__init__()
        self.learner, self.predictor = learner, predictor
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, image: Tensor) -> tuple[Tensor, Tensor]:
        x = (image.to(torch.float32) / 255.0 - self.mean) / self.std
        logits = self.predictor(x.unsqueeze(0)).squeeze(0)
        return logits, logits.softmax(-1)


def portable(loaded):
    """The loaded learner rebuilt with the runtime options that compute the same function in
    plain PyTorch operators (no grouped-convolution rewrites, no C++ kernel), so it can be traced."""
    from metamap.config import resolve
    from metamap.options import RUNTIME, roles
    from metamap.registry import build_learner, plugin
    from metamap.train.checkpoint import load_state, read_tensors, WEIGHTS

    options = plugin("learner", loaded.config["learner"]["name"]).options
    levers = {"backend": "'reference'", "batched": "false", "cpp_kernels": "false", "bf16": "false"}
    overrides = [f"learner.{k}={v}" for k, v in levers.items() if roles(options).get(k) == RUNTIME]
    if not overrides:
        return loaded.learner
    config = resolve(base=loaded.config, overrides=overrides)
    learner = build_learner(config, loaded.info)
    load_state(learner, read_tensors(loaded.path, WEIGHTS, loaded.meta), loaded.path)
    return learner.eval()


def adapted_classifier(loaded, support_x: Tensor, support_y: Tensor) -> AdaptedClassifier:
    """The learner of ``loaded`` (a :class:`~metamap.train.checkpoint.LoadedLearner`) adapted to
    one support set ``support_x [S, C, H, W]`` (model inputs), ``support_y [S]``."""
    if loaded.spec is None:
        raise DataError("this checkpoint was not trained on images, so it cannot be exported as an image classifier")
    if loaded.learner.family == "model":
        raise MetamapError(f"export covers metric, fine-tuning and gradient-based learners; "
                           f"{loaded.learner.name} ({loaded.learner.family}) is not one of them")
    learner = portable(loaded)
    ways = int(support_y.max()) + 1
    with torch.set_grad_enabled(learner.adapts_with_gradients):
        predictor = learner.adapt_tasks(support_x.unsqueeze(0), support_y.unsqueeze(0), ways)

    def constant(x: Tensor) -> Tensor:
        # Adaptation is done: the exported graph runs the predictor only, with no gradients.
        with torch.no_grad():
            return predictor(x)
    return AdaptedClassifier(learner, constant, loaded.spec).eval()


def export_onnx(checkpoint, support: str | Path, out: str | Path) -> Path:
    """Adapt the learner of ``checkpoint`` to the ``support`` folder and write ``out`` (ONNX)."""
    needs_export_extra()
    import onnx

    import metamap
    from metamap.predict import read_support

    loaded = metamap.load(checkpoint)
    if loaded.spec is None:
        raise DataError("this checkpoint was not trained on images, so it cannot be exported as an image classifier")
    support_x, support_y, names = read_support(support, loaded.spec)
    model = adapted_classifier(loaded, support_x, support_y)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    example = torch.zeros(2, *loaded.spec.shape, dtype=torch.uint8)
    with warnings.catch_warnings():
        # The TorchScript-based exporter traces the predictor as it runs: every tensor that the
        # adaptation made becomes a constant of the graph.
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), str(out), input_names=[INPUT], output_names=list(OUTPUTS),
                          dynamic_axes={INPUT: {0: "images"}, **{o: {0: "images"} for o in OUTPUTS}},
                          opset_version=17, dynamo=False)
    proto = onnx.load(str(out))
    meta = {"class_names": json.dumps(names), "preprocessing": json.dumps(loaded.spec.to_dict()),
            "learner": loaded.learner.name, "checkpoint": str(loaded.path), "metamap_version": metamap.__version__,
            "input": INPUT_DOC}
    onnx.helper.set_model_props(proto, meta)
    proto.doc_string = (f"metamap {loaded.learner.name} adapted to {len(names)} classes of {support}; "
                        "see the metadata for the class names and the preprocessing")
    onnx.save(proto, str(out))
    return out


class OnnxClassifier:
    """An exported classifier loaded with ONNX Runtime: ``class_names``, ``spec`` (the
    preprocessing), and ``__call__(uint8 images) -> probabilities``."""

    def __init__(self, path: str | Path):
        needs_export_extra()
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise DataError(f"no exported classifier at {path}")
        try:
            self.session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
            props = self.session.get_modelmeta().custom_metadata_map
            self.class_names = json.loads(props["class_names"])
            from metamap.data.images import ImageSpec
            self.spec = ImageSpec.from_dict(json.loads(props["preprocessing"]))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path} is not a classifier written by `metamap export` ({e})") from None
        except Exception as e:  # onnxruntime raises its own exception types for unreadable models
            raise DataError(f"{path} cannot be loaded by ONNX Runtime ({type(e).__name__}: {e})") from None

    def __call__(self, images: Tensor) -> tuple[Tensor, Tensor]:
        logits, probs = self.session.run(list(OUTPUTS), {INPUT: images.numpy()})
        return torch.from_numpy(logits), torch.from_numpy(probs)
