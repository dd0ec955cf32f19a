"""Fan-out and fan-in: summarise each shard of new data under a registered model, then score the merged summaries.

:func:`summarise_shard` runs in each mapped task; a gate given the summaries (``GateRequest.shard_summaries``)
scores them with :func:`score_shards`, exactly as one pass over the whole batch would (see
:mod:`resque_airflow.runtime.shards`).
"""

from __future__ import annotations

import hashlib
import logging
import tempfile
from collections.abc import Sequence

from resque_airflow.core.fingerprint import Fingerprint
from resque_airflow.registry.artifacts import fetch_model
from resque_airflow.registry.client import ModelRef, resolve_version
from resque_airflow.runtime import pipeline
from resque_airflow.runtime.embed import Embedder
from resque_airflow.runtime.shards import ShardHeader, merge_shards, write_shard

log = logging.getLogger(__name__)


def summarise_shard(
    client,
    ref: ModelRef,
    data: str,
    out_uri: str,
    *,
    provider: str = "auto",
    batch_size: int = pipeline.DEFAULT_BATCH_SIZE,
) -> str:
    """Summarise ``data`` under the model version ``ref`` points at and write the summary to ``out_uri``.

    The model and its fingerprint are downloaded and checked (sha256) as for a gate; the summary is written
    atomically (a reader never sees a partial file). Returns ``out_uri``.

    Raises:
        ResqueInputError: the data, model or fingerprint cannot be used (including a model not registered).
        RegistryError: the registry could not be asked.
    """
    version = resolve_version(client, ref)
    with tempfile.TemporaryDirectory(prefix="resque-shard-") as tmp:
        fetched = fetch_model(client, version, tmp)
        fp = fetched.fingerprint
        embedder = Embedder(
            fetched.model_path.read_bytes(), layer=fp.layer, pooling=fp.pooling, provider=provider,
            model_sha256=fetched.sha256,
        )  # fmt: skip
        summary, stats = pipeline.summarise(embedder, fp, data, batch_size=batch_size)
    header = ShardHeader(fp.model_sha256, fp.layer, stats.n_samples, data, stats.data_hash, bool(stats.labelled))
    write_shard(out_uri, summary, header)
    log.info("shard %s: %d samples summarised to %s", data, stats.n_samples, out_uri)
    return out_uri


def score_shards(
    summaries: Sequence[str], fingerprint: Fingerprint, *, label_source: str, data_uri: str = ""
) -> pipeline.ScoreResult:
    """RESQUE_dist of the merged shard ``summaries`` (in any order) against ``fingerprint``.

    The data hash is that of the shards' hashes, sorted; ``data_uri`` defaults to the shards' data URIs.
    """
    summary, headers = merge_shards(list(summaries), fingerprint)
    digest = hashlib.sha256("".join(sorted(h.data_hash for h in headers)).encode()).hexdigest()
    return pipeline.dist_result(
        fingerprint, summary, label_source=label_source, provider="shards",
        data_uri=data_uri or ",".join(h.data_uri for h in headers), data_hash=digest,
    )  # fmt: skip
