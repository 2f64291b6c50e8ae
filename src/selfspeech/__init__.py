"""selfspeech: self-supervised and semi-supervised speech training, labelling, adaptation and evaluation.

The package is layered: a module imports from its own layer and the layers
before it in :data:`LAYERS`, never from a later one, so the lower layers can
be used (and tested) without the ones above them. ``tests/test_layers.py``
checks every import against this order.
"""
__version__ = "0.1.0"

# Subpackages and top-level modules, lowest layer first.
LAYERS: tuple[tuple[str, ...], ...] = (
    ("config", "accel"),                    # typed configs and their strict loader; devices and precision
    ("audio", "text"),                       # audio I/O and features; text normalisation, phones
    ("data",),                               # manifests, atomic writers, corpora, sampling inputs
    ("models",),                             # networks, model zoo, exports
    ("objectives",),                         # losses and training tasks, one per method
    ("train",),                              # the training loop, checkpoints, distributed helpers
    ("label", "arith", "cluster", "eval"),   # teacher labelling, task vectors, speaker clusters, scoring
    ("adapt",),                              # the Pseudo2Real pipeline
    ("commands", "cli", "demo", "demo_long"),  # the command line and the demo
)
