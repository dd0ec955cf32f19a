"""Shard summaries for fan-out: each mapped task scores one slice of the data and writes its summary to storage.

A shard summary is one ``.npz`` (loaded with ``allow_pickle=False``) holding the :class:`FeatureSummary` arrays and
a JSON header (model sha256, layer, row count, data URI and hash). It is written under a temporary name and then
moved into place, so a gate never reads a partial shard. Summaries merge exactly (class sums add) and a gate
merges them in any order.
"""

from __future__ import annotations

import io
import json
import uuid
import zipfile
from dataclasses import asdict, dataclass

import numpy as np

from resque_airflow.core.fingerprint import Fingerprint
from resque_airflow.core.summary import FeatureSummary
from resque_airflow.errors import ResqueInputError

SHARD_FORMAT = 1


@dataclass(frozen=True)
class ShardHeader:
    """What a shard summary was computed from: the model (sha256, layer), the rows and the data (URI, hash)."""

    model_sha256: str
    layer: str
    n_samples: int
    data_uri: str
    data_hash: str
    labelled: bool
    format_version: int = SHARD_FORMAT


def write_shard(uri: str, summary: FeatureSummary, header: ShardHeader) -> str:
    """Write a shard summary to ``uri`` (local path or fsspec URL) atomically; returns ``uri``."""
    import fsspec

    buf = io.BytesIO()
    np.savez(buf, header=np.array(json.dumps(asdict(header))), **summary.to_arrays(),
             scalars=np.array(json.dumps(summary.to_scalars())))  # fmt: skip
    fs, path = fsspec.core.url_to_fs(uri)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = f"{parent}/.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "wb") as f:
        f.write(buf.getvalue())
    fs.mv(tmp, path)
    return uri


def read_shard(uri: str) -> tuple[FeatureSummary, ShardHeader]:
    """Read a shard summary written by :func:`write_shard`."""
    import fsspec

    try:
        with fsspec.open(uri, "rb") as f:
            raw = f.read()
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        header = ShardHeader(**json.loads(str(arrays.pop("header"))))
        scalars = json.loads(str(arrays.pop("scalars")))
        return FeatureSummary.from_parts(scalars, arrays), header
    except FileNotFoundError as exc:
        raise ResqueInputError(f"shard: {uri} not found; did its shard task succeed?") from exc
    except (OSError, ValueError, KeyError, TypeError, zipfile.BadZipFile) as exc:
        raise ResqueInputError(f"shard: {uri} is damaged or not a shard summary ({type(exc).__name__}: {exc})") from exc


def merge_shards(uris: list[str], fingerprint: Fingerprint) -> tuple[FeatureSummary, list[ShardHeader]]:
    """Merge shard summaries, checking that each was computed with the fingerprint's model and layer."""
    if not uris:
        raise ResqueInputError("shard_summaries: empty list; the fan-out produced no shard")
    total: FeatureSummary | None = None  # merged as they are read: one shard's summary in memory at a time
    headers = []
    for uri in uris:
        summary, header = read_shard(uri)
        if header.format_version > SHARD_FORMAT:
            raise ResqueInputError(f"shard: {uri} has format {header.format_version}; upgrade airflow-provider-resque")
        if header.model_sha256 != fingerprint.model_sha256 or header.layer != fingerprint.layer:
            raise ResqueInputError(
                f"shard: {uri} was computed with another model or layer (sha256 {header.model_sha256[:12]}..., "
                f"layer {header.layer!r}); rerun the shard tasks against the same model version as the gate"
            )
        headers.append(header)
        if total is None:
            total = summary
        else:
            total += summary  # checks first that the shapes (classes, width, sample size) agree
    return total, headers
