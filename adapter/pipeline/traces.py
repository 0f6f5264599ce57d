"""Trace records: what a predictor learns from. One record per example (a suite instance
offline, a shadowed request in production), in ONE format for both.

Record (schema "shadowgate.trace/1"):
  meta (JSON): schema, model_fingerprint, source ("suite" | "shadow"), family, prompt_len,
               targets ("labels" | "pseudo_labels"), criteria; shadow records also
               prompt_targets ("predictable": prompt positions the dense model predicts)
  tensors (safetensors, float32 unless noted):
    predictor_input      (D,)        layer-0 attention block output at the last prompt token
    heads.<criterion>    (L, H)      importance of every head of every layer
    neurons.<criterion>  (L, F)      importance of every FFN neuron of every layer
    token_positions      (P,) int64  target positions (the tokens DejaVu-style predictors see)
    layer_inputs         (P, L, D)   hidden state entering each layer at those positions
    ffn_inputs           (P, L, D)   hidden state entering each layer's FFN block (after its
                                     attention block) at those positions; optional: records
                                     and datasets written before it was traced lack it
    token_heads_l2       (P, L, H)   per-token ||head output||   (magnitude targets)
    token_neurons_l2     (P, L, F)   per-token |neuron activation|
    loss                 ()          summed target NLL of the dense model
A record serialises to two fields, {"meta": JSON text, "tensors": safetensors bytes}: a Redis
stream entry carries exactly these; nothing is pickled.

On disk a dataset version is a folder <root>/v<N>/ with manifest.json (schema, version,
model fingerprint, shape, criteria, splits with record counts), <split>.jsonl (one meta line
per record) and <split>.safetensors (fixed-size fields stacked over records, per-token fields
concatenated with an int64 offsets index "token_offsets" (N+1,)).
"""

from __future__ import annotations

import hashlib
import json
import time
import weakref
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

SCHEMA = "shadowgate.trace/1"
TOKEN_FIELDS = ("token_positions", "layer_inputs", "ffn_inputs", "token_heads_l2", "token_neurons_l2")
# per-token fields a record may lack (older collections, shadow records): a split holds one
# when every record has it
OPTIONAL_TOKEN_FIELDS = ("ffn_inputs",)


_PINNED: "weakref.WeakKeyDictionary[object, str]" = weakref.WeakKeyDictionary()


def model_fingerprint(model) -> str:
    """Identity of a model: its architecture config plus a sample of every weight matrix
    (first row, in float32 on the CPU), so a predictor trained for one checkpoint is refused
    by another.

    It does not depend on the serving dtype or device: the runtime pins the fingerprint of
    the weights as loaded (`pin_fingerprint`, before it casts and moves them), and this
    returns the pinned value for that model object. An unpinned model is hashed as it is;
    for float32 weights that is the same value as the pinned one."""
    pinned = _PINNED.get(model)
    return pinned if pinned is not None else _weights_fingerprint(model)


def pin_fingerprint(model) -> str:
    """Record the fingerprint of `model` as it is now (call before a dtype cast or device
    move; the runtime never changes the weights afterwards)."""
    fp = _weights_fingerprint(model)
    _PINNED[model] = fp
    return fp


def pin_fingerprint_once(model) -> str:
    """Pin unless already pinned: a model handed to the runtime directly is pinned as it
    arrives, and a loader's pin (taken before anything else touched the model) stands."""
    return _PINNED[model] if model in _PINNED else pin_fingerprint(model)


def _weights_fingerprint(model) -> str:
    cfg = model.config.to_dict()
    for key in ("_name_or_path", "transformers_version", "dtype", "torch_dtype", "architectures"):
        cfg.pop(key, None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode())
    for name, p in sorted(model.state_dict().items()):
        if p.dim() == 2:
            digest.update(name.encode())
            digest.update(p[0, :256].detach().float().cpu().numpy().tobytes())
    return digest.hexdigest()[:32]


@dataclass
class TraceRecord:
    meta: dict
    tensors: dict[str, torch.Tensor]

    def to_fields(self) -> dict[str, bytes | str]:
        return {"meta": json.dumps(self.meta), "tensors": save({k: v.contiguous() for k, v in self.tensors.items()})}

    @classmethod
    def from_fields(cls, fields: dict) -> "TraceRecord":
        meta = fields["meta"]
        meta = json.loads(meta.decode() if isinstance(meta, bytes) else meta)
        if meta.get("schema") != SCHEMA:
            raise ValueError(f"trace record schema {meta.get('schema')!r} is not {SCHEMA!r}")
        return cls(meta=meta, tensors=load(fields["tensors"]))


def records_from_scores(scores, meta_common: dict, metas: list[dict],
                        ffn_inputs: list[torch.Tensor] | None = None) -> list[TraceRecord]:
    """Split a criteria.Scores batch into per-example records. ffn_inputs: per example
    (P_b, L, D) at the same positions as the scores' layer_inputs, when traced."""
    out = []
    for j, meta in enumerate(metas):
        tensors = {"predictor_input": scores.predictor_input[j], "loss": scores.loss[j].float()}
        for c, v in scores.heads.items():
            tensors[f"heads.{c}"] = v[j]
        for c, v in scores.neurons.items():
            tensors[f"neurons.{c}"] = v[j]
        tensors["token_positions"] = scores.token_positions[j].long()
        tensors["layer_inputs"] = scores.layer_inputs[j]
        tensors["token_heads_l2"] = scores.token_heads_l2[j]
        tensors["token_neurons_l2"] = scores.token_neurons_l2[j]
        if ffn_inputs is not None:
            tensors["ffn_inputs"] = ffn_inputs[j]
        out.append(TraceRecord(meta={"schema": SCHEMA, **meta_common, **meta}, tensors=tensors))
    return out


def write_split(folder: Path, split: str, records: list[TraceRecord]) -> int:
    if not records:
        raise ValueError(f"no records for split {split!r}")
    fixed = [k for k in records[0].tensors if k not in TOKEN_FIELDS]
    stacked = {k: torch.stack([r.tensors[k] for r in records]) for k in fixed}
    lengths = torch.tensor([r.tensors["token_positions"].numel() for r in records])
    stacked["token_offsets"] = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    for k in TOKEN_FIELDS:
        if k in OPTIONAL_TOKEN_FIELDS and not all(k in r.tensors for r in records):
            continue
        stacked[k] = torch.cat([r.tensors[k] for r in records])
    save_file({k: v.contiguous() for k, v in stacked.items()}, str(folder / f"{split}.safetensors"))
    with open(folder / f"{split}.jsonl", "w") as fh:
        for r in records:
            fh.write(json.dumps(r.meta) + "\n")
    return len(records)


def new_version_dir(root: Path) -> tuple[Path, int]:
    root.mkdir(parents=True, exist_ok=True)
    versions = [int(p.name[1:]) for p in root.glob("v*") if p.name[1:].isdigit()]
    version = max(versions, default=0) + 1
    folder = root / f"v{version}"
    folder.mkdir()
    return folder, version


def write_manifest(folder: Path, version: int, fingerprint: str, shape: dict, criteria: list[str],
                   splits: dict[str, int], extra: dict) -> None:
    manifest = {"schema": SCHEMA, "version": version, "model_fingerprint": fingerprint, "shape": shape,
                "criteria": criteria, "splits": splits, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                **extra}
    (folder / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")


@dataclass
class TraceSet:
    """One split of a dataset version, loaded as stacked tensors."""

    manifest: dict
    tensors: dict[str, torch.Tensor]
    metas: list[dict]

    def __len__(self) -> int:
        return len(self.metas)

    def heads(self, criterion: str) -> torch.Tensor:
        return self._get(f"heads.{criterion}")

    def neurons(self, criterion: str) -> torch.Tensor:
        return self._get(f"neurons.{criterion}")

    def token_field(self, key: str) -> torch.Tensor:
        """A per-token field (concatenated over records, rows indexed by token_offsets)."""
        if key not in self.tensors:
            raise ValueError(f"dataset version {self.manifest['version']} has no per-token field {key!r} "
                             "(it was collected before that field was traced): collect the traces "
                             "again with `shadowgate predictor collect`")
        return self.tensors[key]

    def _get(self, key: str) -> torch.Tensor:
        if key not in self.tensors:
            raise ValueError(f"dataset has no field {key!r}; criteria present: {self.manifest['criteria']}")
        return self.tensors[key]


def resolve_version(path: Path) -> Path:
    """A dataset root (latest version) or one version folder."""
    if (path / "manifest.json").exists():
        return path
    versions = sorted((int(p.name[1:]), p) for p in path.glob("v*") if (p / "manifest.json").exists())
    if not versions:
        raise FileNotFoundError(f"no trace dataset under {path}: run `shadowgate predictor collect`")
    return versions[-1][1]


def load_split(path: Path, split: str) -> TraceSet:
    folder = resolve_version(path)
    manifest = json.loads((folder / "manifest.json").read_text())
    if manifest.get("schema") != SCHEMA:
        raise ValueError(f"{folder} holds schema {manifest.get('schema')!r}, expected {SCHEMA!r}")
    if split not in manifest["splits"]:
        raise ValueError(f"dataset {folder} has no split {split!r} (has {sorted(manifest['splits'])})")
    tensors = load_file(str(folder / f"{split}.safetensors"))
    metas = [json.loads(line) for line in (folder / f"{split}.jsonl").read_text().splitlines()]
    return TraceSet(manifest=manifest, tensors=tensors, metas=metas)
