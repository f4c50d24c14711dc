"""Triton kernels (import name ``oodfast.kernels``) for the hot path of OOD-enhanced DINO training.

One file per op, each read top to bottom: the private ``@triton.jit`` kernels, ``launch_config`` (a pure
function of shapes, dtypes and SM count: tests/kernels/test_compile.py compiles every configuration it
returns), the launcher, the torch path (``<op>_torch``: the same contract in pure torch, what runs for
CPU tensors), the custom-op registration, and the public entry point with ``backend="auto" | "triton" |
"torch"``.

    _op.py            what every op shares: LaunchConfig, num_sms, kernel_op (torch.library
                      triton_op on a GPU host, custom_op otherwise), check_tensor (argument checks whose
                      one-line errors name the argument) and dispatch (the auto / triton / torch choice)
    rare_enqueue.py   rare_enqueue: score -> threshold -> FIFO ring slot -> ring metadata, one launch;
                      rare_score: the scores alone (euclidean, cosine, mahalanobis, precomputed)
    knn_score.py      knn_score: distance to the k-th nearest neighbour in a normalised feature bank
    ring_copy.py      ring_copy: the flagged rows' crops (every view) into their ring slots, one launch

Tests mirror the files: tests/kernels/test_<op>.py (the kernel in Triton's interpreter without a GPU,
against the torch path and an oracle), test_compile.py (the real compiler and ptxas for sm_90a / sm_80).
"""
