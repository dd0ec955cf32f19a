"""Raw text -> token inputs with a Hugging Face ``tokenizers`` tokenizer (``tokenizer.json``).

The tokenizer and its settings are recorded in the fingerprint (:class:`~resque_airflow.core.fingerprint.TextSpec`),
so a gate tokenizes new text exactly as the reference text was. ``tokenizers`` is imported only here.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from resque_airflow.core.fingerprint import TensorSpec, TextSpec, sha256_bytes
from resque_airflow.errors import ResqueInputError


def _tokenizers():
    try:
        import tokenizers
    except ImportError as exc:
        raise ResqueInputError(
            "text data needs the 'tokenizers' package: pip install 'airflow-provider-resque[text]'"
        ) from exc
    return tokenizers


def text_spec(
    tokenizer_path: str | Path,
    inputs: Sequence[TensorSpec],
    *,
    column: str = "text",
    max_length: int = 128,
    padding: str = "max_length",
) -> TextSpec:
    """The :class:`TextSpec` of a ``tokenizer.json`` for a model with ``inputs``.

    The token ids feed ``input_ids`` (else the model's only integer input), the attention mask ``attention_mask``
    and the token type ids ``token_type_ids`` where the model has them; any other input is an error.
    """
    path = Path(tokenizer_path)
    if not path.is_file():
        raise ResqueInputError(f"tokenizer: {path} not found; give the model's tokenizer.json")
    text = path.read_text(encoding="utf-8")
    try:
        _tokenizers().Tokenizer.from_str(text)
    except Exception as exc:
        raise ResqueInputError(f"tokenizer: {path} is not a tokenizers tokenizer.json ({exc})") from exc
    names = [s.name for s in inputs]
    ints = [s.name for s in inputs if np.dtype(s.dtype).kind in "iu"]
    ids = "input_ids" if "input_ids" in names else (ints[0] if len(ints) == 1 else None)
    if ids is None:
        raise ResqueInputError(
            f"tokenizer: the model's inputs {names} have no 'input_ids' (nor a single integer input) to feed token "
            "ids into"
        )
    mask = "attention_mask" if "attention_mask" in names else None
    types = "token_type_ids" if "token_type_ids" in names else None
    other = [n for n in names if n not in (ids, mask, types)]
    if other:
        raise ResqueInputError(
            f"tokenizer: the model also takes {other}, which text cannot feed; give .npz/Parquet arrays named after "
            "every input instead"
        )
    return TextSpec(
        tokenizer_json=text, tokenizer_sha256=sha256_bytes(text.encode()), column=column, max_length=max_length,
        padding=padding, ids_input=ids, mask_input=mask, type_ids_input=types,
    )  # fmt: skip


@lru_cache(maxsize=4)
def _load(tokenizer_json: str, max_length: int, padding: str):
    tok = _tokenizers().Tokenizer.from_str(tokenizer_json)
    tok.enable_truncation(max_length)
    pad = tok.padding or {}
    pad_id = pad.get("pad_id")
    pad_token = pad.get("pad_token")
    if pad_id is None:
        for candidate in ("[PAD]", "<pad>", "<|pad|>"):
            if tok.token_to_id(candidate) is not None:
                pad_id, pad_token = tok.token_to_id(candidate), candidate
                break
    kwargs = {"pad_id": pad_id or 0, "pad_token": pad_token or "[PAD]"}
    tok.enable_padding(length=max_length if padding == "max_length" else None, **kwargs)
    return tok


def encode(spec: TextSpec, texts: Sequence[object], where: str) -> dict[str, np.ndarray]:
    """Token inputs ``{input name: (n, T) int64}`` for ``texts``; a missing or non-string text is an error."""
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            what = "missing (null)" if t is None else f"a {type(t).__name__}, not text"
            raise ResqueInputError(f"data: {where}: text {spec.column!r} of row {i} is {what}; drop or fill it")
    tok = _load(spec.tokenizer_json, spec.max_length, spec.padding)
    enc = tok.encode_batch(list(texts))
    out = {spec.ids_input: np.array([e.ids for e in enc], np.int64)}
    if spec.mask_input:
        out[spec.mask_input] = np.array([e.attention_mask for e in enc], np.int64)
    if spec.type_ids_input:
        out[spec.type_ids_input] = np.array([e.type_ids for e in enc], np.int64)
    return out
