"""The ``encode`` technique: prune -> **cluster -> code**, measured by really encoding.

Clustering (k-means per layer, optional centroid fine-tuning) changes the model; coding does
not, it only measures: the clustered model is encoded to ``.slim`` bytes in memory and the
record carries the packed size per layer and in total. Nothing is written to disk here;
:func:`slimkit.encode.pack` writes the file when asked.
"""

from __future__ import annotations

from slimkit.core.errors import ConfigError
from slimkit.core.record import Record
from slimkit.core.stages import StageContext, commit_transforms, register_stage
from slimkit.encode.cluster import cluster_weights
from slimkit.encode.config import EncodeConfig
from slimkit.encode.slimfile import pack_bytes
from slimkit.io.linear import prepare_layers
from slimkit.io.model import SlimModel

_SUMMARY = ("bytes", "header_bytes", "manifest_bytes", "payload_bytes", "breakdown", "layers",
            "tensors",
            "params", "float32_bytes", "ratio", "shared_weights", "shared_nonzero",
            "bits_per_weight", "stream_bits_per_weight", "entropy_bits_per_weight", "tied")


@register_stage(EncodeConfig)
def encode(model: SlimModel, cfg: EncodeConfig, ctx: StageContext) -> tuple[SlimModel, Record]:
    """Cluster a copy of ``model`` and measure its packed size.

    Args:
        model: the (usually pruned) model; left untouched.
        cfg: the encode config.
        ctx: ``data`` is needed only for ``cfg.finetune``; ``teacher`` (default: ``model``)
            for ``finetune.distill``.

    Returns:
        The clustered model (plain modules; weights take the shared values) and a Record whose
        ``details["packed"]`` holds the ``.slim`` size in bytes per layer and in total, bits per
        weight and the entropy bound.

    Raises:
        ConfigError: fine-tuning without data, or no layer to cluster.

    Hugging Face Conv1D layers count as Linear: they are converted first (same math,
    recorded, replayed when an artifact or a ``.slim`` file is loaded). A layer whose weight
    another module holds (a tied LM head) is left unclustered, since clustering it would
    change the embedding too, unless named exactly in ``include`` (the record then says the
    embedding is clustered with it); see :func:`slimkit.io.linear.prepare_layers`.

    Example:
        >>> clustered, rec = encode(pruned, EncodeConfig(conv_bits=8, fc_bits=5))  # doctest: +SKIP
        >>> rec.details["packed"]["bytes"]  # doctest: +SKIP
    """
    if cfg.finetune is not None and ctx.data is None:
        raise ConfigError("stage encode: finetune needs training data (give --data)")
    model, cfg, prep = prepare_layers(model, cfg, "encode",
                                      convert="Linear" in cfg.layer_types, in_place="clustered")
    module, record = cluster_weights(model.module, cfg, ctx.data, ctx.teacher_module,
                                     ctx.progress)
    clustered = model.copy(module)
    prep.finish(record)
    # Measure the file as it will be written: its architecture replays the conversion.
    measured = clustered.copy(module)
    commit_transforms(measured, record)
    _, report = pack_bytes(measured, cfg)
    record.details["packed"] = {k: report[k] for k in _SUMMARY}
    record.changed.append(
        f"packed .slim: {report['bytes']:,} bytes ({report['ratio']:.1f}x smaller than "
        f"float32), {report['bits_per_weight']:.3f} bits per clustered weight (streams "
        f"{report['stream_bits_per_weight']:.3f}, entropy bound "
        f"{report['entropy_bits_per_weight']:.3f})")
    return clustered, record
