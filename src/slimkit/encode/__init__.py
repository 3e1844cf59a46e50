"""Weight sharing and entropy coding (Deep Compression), and the packed model file ``.slim``.

Cluster: :func:`cluster_weights` (k-means per layer, centroid fine-tuning). Code:
:func:`pack` / :func:`pack_bytes` write a ``.slim`` file (canonical Huffman or ANS per stream),
:func:`unpack` / :func:`read_packed` read it back bit-exactly, after checking it.
:func:`encode` does both as the ``encode`` stage. Names are imported on first use (see
:mod:`slimkit.core.lazy`); the config needs no torch.
"""

from slimkit.core.lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, {
    "slimkit.encode.cluster": ("SharedWeight", "apply_clusters", "cluster_weights",
                               "plan_clusters", "share_weights", "unshare_weights"),
    "slimkit.encode.config": ("EncodeConfig",),
    "slimkit.encode.huffman": ("canonical_codes", "code_lengths", "huffman_decode",
                               "huffman_encode"),
    "slimkit.encode.kmeans": ("assign_nearest", "kmeans_1d", "linear_init"),
    "slimkit.encode.slimfile": ("pack", "pack_bytes", "read_packed", "unpack"),
    "slimkit.encode.sparse": ("from_relative", "to_relative"),
    "slimkit.encode.stage": ("encode",),
    "slimkit.encode.streams": ("decode_stream", "encode_stream", "entropy_bits"),
})
