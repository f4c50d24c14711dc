"""``oodfast evaluate``: detection quality against mask ground truth, and representation probes.

Every module reads BDD10K-layout splits with masks (synthdrive or real BDD10K) and takes a frozen
encoder from :func:`oodfast.encoders.load_encoder`. One concern per module:

Detection (``oodfast evaluate detect``)
    ``metrics.py``       binary detection metrics; AUROC / AUPR / FPR at 95% TPR / PR curves
                         (scikit-learn); image-level (cluster) bootstrap intervals (scipy).
    ``objects.py``       rare object instances of the masks and per-object recall.
    ``crop_pass.py``     the global crops: loaded, labelled (share, instances), embedded / mapped.
    ``detectors.py``     the pooled and dense detectors, calibrated and scored batch by batch.
    ``detect.py``        the paper's detection table: every detector, calibration size and
                         percentile, ground truth from the masks (:func:`evaluate_detection`).
    ``pr_plot.py``       the precision-recall curves as a PNG (Pillow).

Representation (``oodfast evaluate represent``), in the order the evaluation runs
    ``labels.py``        per-crop labels from a mask (dominant class, rare presence) and the
                         pixel share of each class over a split.
    ``bands.py``         head / middle / tail frequency bands from the class pixel shares.
    ``features.py``      deterministic crops of every image and their frozen-encoder features.
    ``probes.py``        DINO's weighted kNN and the linear probe (scikit-learn) on those features.
    ``probe_metrics.py`` accuracy per band, binary / balanced accuracy and AUROC, and the mean
                         and Student-t interval over probe seeds.
    ``represent.py``     the whole evaluation and its markdown report
                         (:func:`evaluate_representation`); the steps' names are importable from
                         it too.

Comparison (``oodfast evaluate compare``)
    ``compare.py``       several ``represent`` reports (arms x pretraining seeds) in one table.

Imports run one way: each representation module uses only those listed above it (``represent``
all of them), ``compare`` reads report files and uses ``probe_metrics`` only, and nothing here
imports ``oodfast.train`` or the CLI.
"""
