"""oodfast: fast OOD-enhanced DINO self-supervised pretraining.

Implements the method of *Enhancing Visual Encoder Self-Supervised Pre-training With OOD Detector*
(Wang, Zhou, Su; NYU): rare images, flagged by an embedding-distance score, are kept in a FIFO buffer
that is replayed with every DINO batch.
"""

__version__ = "0.1.0"
