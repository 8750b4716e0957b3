"""A standalone classifier for the classes of a support folder: ``metamap export`` (ONNX).

The learner of a checkpoint adapts to the support folder as ``metamap predict`` does (the same
``adapt -> predictor`` path); the predictor is then traced into an ONNX graph in which whatever
adaptation produced (prototypes, support embeddings, a fitted head, adapted weights) is a
constant. The graph takes the images as ``uint8 [N, C, H, W]`` (the output of the training
preprocessing's lossy part, :meth:`ImageSpec.prepare`), does the rest of the preprocessing
itself (scale to [0, 1], normalise), and returns the learner's scores and their softmax (the
score ``predict`` reports). Class names, the preprocessing and how the scores read are in the
model's metadata (``metamap.*`` keys).

The graph is written by PyTorch's TorchScript-based exporter (``dynamo=False``): it records the
predictor as it runs, so the Python-side input checks of ``adapt`` leave no trace in it, and it
needs no package beyond ``onnx`` (the ``torch.export``-based exporter needs ``onnxscript`` and
refuses those data-dependent checks).
"""
from __future__ import annotations

import contextlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from metamap.data.images import ImageSpec, list_images
from metamap.data.paths import atomic_write, check_output_file
from metamap.errors import DataError, ExportError, MetamapError

OPSET = 17
INPUT = "images"
OUTPUTS = ("scores", "probabilities")
# The exported graph must reproduce torch's outputs on the support images within this.
ATOL, RTOL = 1e-4, 1e-4
EXTRA_HINT = "install the optional packages with: pip install 'metamap[export]' (onnx and onnxruntime)"
SUPPORTED = ("metric learners (protonet, matching, siamese, relation), the fine-tuning baseline (finetune) and "
             "the gradient learners (maml, fomaml, anil, metasgd, reptile)")
SCORES = {"protonet": "negative squared Euclidean distances to the class prototypes",
          "matching": "log attention mass on each class (log-probabilities)",
          "siamese": "similarity to the most similar support example of each class",
          "relation": "relation scores in [0, 1]",
          "finetune": "logits of the head fitted on the support set"}


def require_onnx():
    """``(onnx, onnxruntime)``, or an :class:`ExportError` saying how to install them."""
    try:
        import onnx
        import onnxruntime
    except ImportError as e:
        raise ExportError(f"exporting needs onnx and onnxruntime ({e}); {EXTRA_HINT}") from None
    return onnx, onnxruntime


@dataclass
class Export:
    """What :func:`export_classifier` wrote."""

    path: Path
    learner: str
    classes: list[str]
    shots: list[int]
    input_shape: tuple[int, ...]
    batch_dependent: bool
    max_abs_diff: float        # onnxruntime against torch, on the support images

    def summary(self) -> str:
        c, h, w = self.input_shape
        lines = [f"wrote {self.path}: {self.learner}, {len(self.classes)} classes ({', '.join(self.classes)}), "
                 f"input '{INPUT}' uint8 [N, {c}, {h}, {w}], outputs {' and '.join(OUTPUTS)} [N, {len(self.classes)}]",
                 f"onnxruntime matches torch on the {sum(self.shots)} support images (max abs difference "
                 f"{self.max_abs_diff:.2g})"]
        if self.batch_dependent:
            lines.append("its batch norm uses each batch's statistics (as in training): an image's scores depend on "
                         "the other images of its batch; classify in batches as `metamap predict` does")
        return "\n".join(lines)


class Classifier(nn.Module):
    """``uint8 images [N, C, H, W]`` -> ``(scores, probabilities) [N, ways]`` through ``predictor``."""

    def __init__(self, predictor, spec: ImageSpec):
        super().__init__()
        self.predictor, self.spec = predictor, spec

    def forward(self, images: Tensor) -> tuple[Tensor, Tensor]:
        scores = self.predictor(self.spec.to_input(images))
        return scores, scores.softmax(-1)


def check_exportable(learner, spec) -> None:
    """Refuse, before any work, what cannot become a standalone image classifier."""
    from metamap.algorithms.gradient import GradientLearner
    if spec is None:
        raise DataError("this checkpoint was not trained on images, so it cannot be exported as an image classifier")
    family = getattr(learner, "family", "")
    if family not in ("metric", "baseline", "optimization"):
        raise ExportError(f"{learner.name} ({family or 'unknown'} family) cannot be exported: its predictor is not a "
                          f"plain function of the query images; export supports the {SUPPORTED}")
    if isinstance(learner, GradientLearner):
        if not learner.transductive and learner.bn == "transductive":
            raise ExportError("learner.transductive = false classifies each query in a batch of its own with the "
                              "support set, which the exported graph cannot do for a batch of any size; export "
                              "supports transductive batch norm (learner.transductive = true) or learner.bn = "
                              '"running"')
        if learner.full.name != "fast" and learner.model is not None:
            from metamap.nets.program import lower
            if lower(learner.model, "") is None:
                raise ExportError(f"{learner.name}: its network does not lower to the fast backend's operations "
                                  "(the reference backend cannot be traced); export supports gradient learners on "
                                  "the conv4, mlp and resnet12 backbones")


@contextlib.contextmanager
def traceable(learner):
    """The learner set up for tracing: its weights constants (no gradient), and for a gradient
    learner the fast backend with every lever off (folded and fused batch norm, the C++ kernel and
    channels-last memory compute the same function with operations ONNX does not have)."""
    from metamap.algorithms.gradient import GradientLearner
    from metamap.nets.backend import BackendOptions
    flags = [(p, p.requires_grad) for p in learner.parameters()]
    with contextlib.ExitStack() as stack:
        if isinstance(learner, GradientLearner):
            stack.enter_context(learner.running_on(BackendOptions("fast", channels_last=False, fuse_bn_pool=False,
                                                                  fold_bn=False, cpp_kernels=False)))
        try:
            yield
        finally:
            for p, flag in flags:
                p.requires_grad_(flag)


def trace_to_onnx(classifier: Classifier, example: Tensor, learner) -> bytes:
    """The classifier as an ONNX model (bytes), for batches of any size."""
    buffer = io.BytesIO()
    learner.requires_grad_(False)      # weights become constants of the graph
    with warnings.catch_warnings(), torch.no_grad():
        # The TorchScript exporter's deprecation notice and the tracer's notes on the input checks
        # (they are Python-side checks: they leave nothing in the graph).
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(classifier.eval(), (example,), buffer, dynamo=False, opset_version=OPSET,
                              input_names=[INPUT], output_names=list(OUTPUTS),
                              dynamic_axes={INPUT: {0: "batch"}, **{o: {0: "batch"} for o in OUTPUTS}})
        except (RuntimeError, AssertionError, torch.onnx.errors.OnnxExporterError, MetamapError) as e:
            raise ExportError(f"{learner.name}: the ONNX exporter cannot write this predictor "
                              f"({str(e).splitlines()[0][:300]})") from None
    return buffer.getvalue()


def preprocessing_text(spec: ImageSpec) -> str:
    """How an image file becomes the graph's input, in words (also in the model's metadata)."""
    mode = "grey (Pillow mode L)" if spec.channels == 1 else "RGB"
    return (f"Each image file: turned upright by its EXIF orientation; transparent pixels composited onto white; "
            f"16-bit and float images rescaled to 8 bits; converted to {mode}; resized to {spec.size}x{spec.size} "
            f"with Pillow's {spec.resample} filter (if not that size already); "
            + ("inverted (255 - v); " if spec.invert else "")
            + f"laid out as uint8 [{spec.channels}, {spec.size}, {spec.size}] (channels, height, width). "
            f"Images are stacked into '{INPUT}' uint8 [N, {spec.channels}, {spec.size}, {spec.size}]; the graph "
            f"itself computes (v / 255 - mean) / std with mean {list(spec.mean)} and std {list(spec.std)}.")


def metadata(learner, spec: ImageSpec, names: list[str], shots: list[int], batch_dependent: bool) -> dict[str, str]:
    from metamap import __version__
    return {
        "metamap.classes": json.dumps(names),
        "metamap.shots": json.dumps(shots),
        "metamap.learner": learner.name,
        "metamap.preprocessing": json.dumps(spec.to_dict()),
        "metamap.preprocessing_steps": preprocessing_text(spec),
        "metamap.scores": SCORES.get(learner.name, "outputs of the adapted network (logits)"),
        "metamap.batch_dependent": json.dumps(batch_dependent),
        "metamap.version": __version__,
    }


def batch_dependent(learner) -> bool:
    """Whether an image's scores depend on the other images of its batch (transductive batch norm)."""
    from metamap.algorithms.gradient import GradientLearner
    return isinstance(learner, GradientLearner) and learner.bn == "transductive"


def export_classifier(checkpoint, support: str | Path, out: str | Path) -> Export:
    """Adapt the learner of ``checkpoint`` (a path, or what :func:`metamap.load` returned) to the
    ``support`` folder (one sub-folder of images per class) and write the ONNX classifier ``out``.

    The written graph is checked against torch first: onnxruntime's outputs on the support images
    must equal the torch predictor's (within 1e-4); nothing is written otherwise.
    """
    import metamap
    from metamap.predict import read_support
    out = check_output_file(out, "--out")
    onnx, ort = require_onnx()
    loaded = metamap.load(checkpoint) if isinstance(checkpoint, (str, Path)) else checkpoint
    learner, spec = getattr(loaded, "learner", loaded), loaded.spec
    check_exportable(learner, spec)
    support_x, support_y, names = read_support(support, spec)
    images = spec.load_many(_support_files(support))
    was_training = learner.training
    learner.eval()
    try:
        with traceable(learner):
            with torch.set_grad_enabled(learner.adapts_with_gradients):
                predictor = learner.adapt(support_x, support_y, ways=len(names))
            classifier = Classifier(predictor, spec)
            with torch.no_grad():
                expected = [t.numpy() for t in classifier(images)]
            model = onnx.load_from_string(trace_to_onnx(classifier, images, learner))
    finally:
        learner.train(was_training)
    shots = torch.bincount(support_y, minlength=len(names)).tolist()
    dependent = batch_dependent(learner)
    model.doc_string = (f"metamap {learner.name} classifier for {len(names)} classes, adapted to {sum(shots)} "
                        f"labelled images. Input: {preprocessing_text(spec)}")
    onnx.helper.set_model_props(model, metadata(learner, spec, names, shots, dependent))
    onnx.checker.check_model(model)
    data = model.SerializeToString()
    got = session(data, ort).run(None, {INPUT: images.numpy()})
    diff = max(float(abs(g - e).max()) for g, e in zip(got, expected))
    if not all(bool(torch.allclose(torch.from_numpy(g), torch.from_numpy(e), rtol=RTOL, atol=ATOL))
               for g, e in zip(got, expected)):
        raise ExportError(f"{learner.name}: the exported graph's outputs differ from torch's by up to {diff:.3g} on "
                          f"the support images; nothing was written")
    with atomic_write(out) as f:
        f.write(data)
    return Export(out, learner.name, names, shots, spec.shape, dependent, diff)


def _support_files(folder: str | Path) -> list[Path]:
    """The support images in :func:`metamap.predict.read_support`'s order."""
    classes = sorted(p for p in Path(folder).iterdir() if p.is_dir() and not p.name.startswith("."))
    return [f for c in classes for f in list_images(c)]


def session(model, ort=None, threads: int = 0):
    """An onnxruntime session on the CPU for ``model`` (bytes or a path)."""
    ort = ort or require_onnx()[1]
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model if isinstance(model, bytes) else str(model), options,
                                providers=["CPUExecutionProvider"])


@dataclass
class OnnxClassifier:
    """An exported classifier read back: its onnxruntime session, class names and preprocessing."""

    session: object
    classes: list[str]
    spec: ImageSpec
    meta: dict[str, str]

    @classmethod
    def open(cls, path: str | Path, threads: int = 0) -> OnnxClassifier:
        onnx, ort = require_onnx()
        path = Path(path)
        if not path.is_file():
            raise DataError(f"{path} does not exist or is not a file; give the .onnx file `metamap export` wrote")
        try:
            meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
            classes, spec = json.loads(meta["metamap.classes"]), ImageSpec.from_dict(json.loads(meta["metamap.preprocessing"]))
        except (KeyError, ValueError, TypeError) as e:
            raise DataError(f"{path} is not a classifier written by `metamap export` ({e.__class__.__name__}: {e})"
                            ) from None
        except Exception as e:       # onnx's DecodeError and the like: not an ONNX file
            raise DataError(f"{path} is not an ONNX model ({e.__class__.__name__}: {e})") from None
        return cls(session(path, ort, threads), classes, spec, meta)

    def scores(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``uint8 [N, C, H, W]`` (``spec.load_many``) -> ``(scores, probabilities) [N, ways]``."""
        scores, probs = self.session.run(None, {INPUT: images.numpy()})
        return torch.from_numpy(scores), torch.from_numpy(probs)


def predict_onnx(model: str | Path, query: str | Path, batch_size: int = 256, threads: int = 0):
    """``metamap predict``'s rows for the images of ``query``, by an exported classifier (onnxruntime),
    in the same batches as ``predict`` (this matters for transductive batch norm)."""
    from metamap.predict import Prediction
    classifier = OnnxClassifier.open(model, threads)
    query = Path(query)
    if not query.is_dir():
        raise DataError(f"query folder {query} does not exist or is not a folder")
    paths = list_images(query)
    out: list[Prediction] = []
    for start in range(0, len(paths), batch_size):
        chunk = paths[start:start + batch_size]
        score, label = classifier.scores(classifier.spec.load_many(chunk))[1].max(-1)
        out += [Prediction(p.name, classifier.classes[int(k)], float(s)) for p, k, s in zip(chunk, label, score)]
    return out
