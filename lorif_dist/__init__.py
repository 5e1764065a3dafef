"""lorif_dist: distributed LoRIF training-data attribution for causal language models.

LoRIF (Low-Rank Influence Functions) scores how much each training example pushed a model
towards a query's response:

    I(q, t) = sum over tracked layers of g_q^T (G^T G + lambda I)^-1 g_t

where g is a per-example gradient projected on both sides (LoGRA) and stored as rank-c
factors, and G^T G is a rank-r curvature from a randomized SVD, inverted with the Woodbury
identity. The pipeline has three stages, each a CLI subcommand and a function:

    extract    per-example projected gradients -> rank-c factors in per-rank HDF5 shards
    curvature  per-layer randomized SVD of the stored factors -> (V, s, lambda)
    query      precondition each query once, score every training example, merge top-k

Glossary (one word for one thing, everywhere in this package):

    example          one training record (prompt + response); its id is its row in the
                     dataset file(s), stable across runs, tasks and ranks
    query            an example whose response we want to explain
    layer            a tracked linear module (nn.Linear or GPT-2 Conv1D), by module name
    f                projection factor: d1 = in_features // f, d2 = out_features // f
    d1, d2, D        projected input / output widths of a layer, and D = d1 * d2
    c                factor rank: each example's projected gradient is stored as
                     left (d1 x c) * diag(scale) * right (d2 x c)^T
    r, p             curvature rank and oversampling of the randomized SVD
    damping          lambda added to the curvature's diagonal
    shard            one HDF5 file written by one (array task, rank)
    index            the directory holding the manifest, shards and curvature
    score            I(q, t) for one query and one training example
    method           extract.method: "lorif" (the above), or the baselines on the same
                     capture and projection, "logra" (dense gradients, exact D x D damped
                     inverse) and "graddot" (dense gradients, no curvature)
    normalization    query.normalize: none, unit (unit-norm training gradients) or cosine
                     (I(q, t) / sqrt(I(q, q) I(t, t)))
    hub              a training example in the top-k of many unrelated queries
    rank, world_size torch.distributed's process rank and process count
"""

__version__ = "0.1.0"
