"""Sequence-classification fields of an HF `config.json` <-> ModelConfig's, every family.

    *ForSequenceClassification in architectures  <->  model.num_labels > 0
    num_labels (else len(id2label), else 2)        <->  model.num_labels
    id2label (names other than LABEL_i)            <->  model.label_names
    pad_token_id                                   <->  model.pad_token_id (-1: null)
    problem_type                                   <->  regression (num_labels 1) or
                                                        single_label_classification

HF pools a decoder's scores at the last token that is not config.pad_token_id, so
the id is part of the model here (`jaxlm.model.layers.score.pool_positions`).
Multi-label classification (a sigmoid per label) is not supported.
"""

from __future__ import annotations

from ...errors import CheckpointError
from .io import CONFIG_FILE

SUFFIX = "ForSequenceClassification"


def is_classifier(hf: dict) -> bool:
    return any(str(a).endswith(SUFFIX) for a in hf.get("architectures") or ())


def label_fields(hf: dict) -> dict:
    """ModelConfig fields (num_labels, pad_token_id, label_names) of a classifier's
    config.json; {} for any other architecture."""
    if not is_classifier(hf):
        return {}
    id2label = hf.get("id2label") or {}
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
        n = int(hf.get("num_labels") or len(names) or 2)
    except (TypeError, ValueError):
        raise CheckpointError(f"{CONFIG_FILE}: id2label should map label ids to names, got "
                              f"{id2label!r:.80}") from None
    if names and len(names) != n:
        raise CheckpointError(f"{CONFIG_FILE}: num_labels={n} but id2label has {len(names)} "
                              "labels")
    problem = hf.get("problem_type")
    expected = "regression" if n == 1 else "single_label_classification"
    if problem not in (None, expected):
        raise CheckpointError(f"{CONFIG_FILE}: problem_type {problem!r} with num_labels={n} is "
                              "not supported (supported: regression with num_labels 1, "
                              "single_label_classification with 2 or more)")
    pad = hf.get("pad_token_id")
    if isinstance(pad, list):  # some configs list several; HF compares with the value
        pad = pad[0] if pad else None
    default = names == [f"LABEL_{i}" for i in range(n)]
    return {"num_labels": n, "pad_token_id": -1 if pad is None else int(pad),
            "label_names": () if default else tuple(names)}


def hf_label_fields(cfg) -> dict:
    """The config.json keys of a classifier cfg (num_labels > 0; as save_pretrained
    writes them: num_labels is id2label's length); {} otherwise."""
    if not cfg.num_labels:
        return {}
    names = cfg.label_names or tuple(f"LABEL_{i}" for i in range(cfg.num_labels))
    return {"id2label": {str(i): name for i, name in enumerate(names)},
            "label2id": {name: i for i, name in enumerate(names)},
            "problem_type": "regression" if cfg.num_labels == 1 else
            "single_label_classification",
            "pad_token_id": None if cfg.pad_token_id < 0 else cfg.pad_token_id}
