"""oodfast: fast OOD-enhanced DINO self-supervised pretraining.

Implements the method of *Enhancing Visual Encoder Self-Supervised Pre-training With OOD Detector*
(Wang, Zhou, Su; NYU): rare images, flagged by an embedding-distance score, are kept in a FIFO buffer
that is replayed with every DINO batch.

Layers, each importing only those below it (README.md's Layout section lists every file):
``oodfast.kernels`` (Triton ops), ``devices``, ``safeload``, ``vit``, ``visualize`` -> ``encoders``,
``paper``, ``buffer`` (RareRing) -> ``detect`` (RareDetector) -> ``data`` -> ``replay`` (detector +
ring) -> ``train`` (the DINO step and the loop) -> ``evaluate``, ``bench`` -> ``oodfast.cli``;
``compat`` and ``patch`` put the fused pieces into DINO code written for the paper's API.
"""

__version__ = "0.1.0"
