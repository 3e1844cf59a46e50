"""Weight sharing and entropy coding (Deep Compression), and the packed model file ``.slim``.

Cluster: :func:`cluster_weights` (k-means per layer, centroid fine-tuning). Code:
:func:`pack` / :func:`pack_bytes` write a ``.slim`` file (canonical Huffman or ANS per stream),
:func:`unpack` / :func:`read_packed` read it back bit-exactly, after checking it.
:func:`encode` does both as the ``encode`` stage.
"""

from slimkit.encode.cluster import (
    SharedWeight,
    apply_clusters,
    cluster_weights,
    plan_clusters,
    share_weights,
    unshare_weights,
)
from slimkit.encode.config import EncodeConfig
from slimkit.encode.huffman import canonical_codes, code_lengths, huffman_decode, huffman_encode
from slimkit.encode.kmeans import assign_nearest, kmeans_1d, linear_init
from slimkit.encode.slimfile import pack, pack_bytes, read_packed, unpack
from slimkit.encode.sparse import from_relative, to_relative
from slimkit.encode.stage import encode
from slimkit.encode.streams import decode_stream, encode_stream, entropy_bits

__all__ = [
    "EncodeConfig",
    "SharedWeight",
    "apply_clusters",
    "assign_nearest",
    "canonical_codes",
    "cluster_weights",
    "code_lengths",
    "decode_stream",
    "encode",
    "encode_stream",
    "entropy_bits",
    "from_relative",
    "huffman_decode",
    "huffman_encode",
    "kmeans_1d",
    "linear_init",
    "pack",
    "pack_bytes",
    "plan_clusters",
    "read_packed",
    "share_weights",
    "to_relative",
    "unpack",
    "unshare_weights",
]
