"""Input drift of the predictor: per-request feature rows, a version's reference, Evidently.

The predictor sees one vector per request: the layer-0 attention output at the last prompt
token, min-max normalised per example. Drift in that vector is what can make its head and
neuron rankings wrong, so each request becomes one row of low-dimensional features:

  pc00..pc{k-1}   projection of the normalised predictor input on the top-k principal
                  directions of the version's training inputs (a fixed Basis per version)
  prompt_len      tokens of the prompt as served (the tokenizer's <bos> included)
  head_entropy    how flat the predicted head scores are (see feature_rows)
  neuron_entropy  the same for neurons
  keep_margin     how clear-cut the keep/skip decision between heads is at sparsity 0.5

A predictor version's reference is the feature rows of the prompts it was trained on plus
its Basis, stored in the version's artifact folder under reference/. check_drift runs
Evidently's DataDriftPreset of a window of current rows against that reference and returns
Evidently's own per-column and dataset-level decisions.

Shapes: N requests, D model dim, k principal components, n gated layers (L-1), H heads,
F FFN neurons.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from adapter.runtime import masks
from adapter.selection.predictors import minmax

REFERENCE_DIR = "reference"
FEATURES_FILE = "features.parquet"
BASIS_FILE = "basis.safetensors"
SCALAR_COLUMNS = ["prompt_len", "head_entropy", "neuron_entropy", "keep_margin"]
MARGIN_SPARSITY = 0.5  # fixed, so keep_margin stays comparable when the served sparsity changes
_EXACT_SVD_MAX = 4096  # above this min(N, D) the randomised pca_lowrank is used


class MissingReference(ValueError):
    """A predictor version has no usable drift reference (absent or unreadable)."""


PC_COLUMNS = [f"pc{i:02d}" for i in range(16)]  # for the default k = 16


def feature_columns(k: int = 16) -> list[str]:
    """pc00..pc{k-1} then the four scalar columns: the columns check_drift tests."""
    return [f"pc{i:02d}" for i in range(k)] + SCALAR_COLUMNS


# ---- the basis ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Basis:
    """Principal directions of min-max-normalised predictor inputs."""

    mean: torch.Tensor  # (D,)
    components: torch.Tensor  # (k, D), orthonormal rows, by decreasing variance

    @property
    def k(self) -> int:
        return self.components.shape[0]


def fit_basis(inputs: torch.Tensor, k: int = 16, seed: int = 0) -> Basis:
    """inputs (N, D) RAW predictor inputs -> top-k principal directions of minmax(inputs).

    Deterministic: exact SVD (float64) when min(N, D) is moderate, else pca_lowrank under a
    fixed seed. Each component's sign is fixed (its largest-|.| entry positive), so refits
    on the same data give the same projections, not mirrored ones."""
    x = minmax(inputs.detach().to("cpu", torch.float64))
    if x.ndim != 2 or not 0 < k <= min(x.shape):
        raise ValueError(f"need inputs (N, D) with k <= min(N, D); got {tuple(x.shape)} and k={k}")
    mean = x.mean(0)
    xc = x - mean
    if min(xc.shape) <= _EXACT_SVD_MAX:
        vt = torch.linalg.svd(xc, full_matrices=False).Vh[:k]
    else:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            vt = torch.pca_lowrank(xc, q=min(k + 8, min(xc.shape)), center=False)[2].T[:k]
    sign = vt.gather(1, vt.abs().argmax(1, keepdim=True)).sign()
    return Basis(mean=mean.float(), components=(vt * sign).float().contiguous())


def project(basis: Basis, inputs: torch.Tensor) -> torch.Tensor:
    """RAW predictor inputs (N, D) or (D,) -> coordinates (N, k) in the basis."""
    x = minmax(inputs.detach().to("cpu", torch.float32).reshape(-1, basis.mean.shape[0]))
    return (x - basis.mean) @ basis.components.T


def save_basis(basis: Basis, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"mean": basis.mean.contiguous(), "components": basis.components.contiguous()}, str(path),
              metadata={"normalisation": "minmax_per_example", "k": str(basis.k)})
    return path


def load_basis(path: Path) -> Basis:
    try:
        t = load_file(str(path))
        basis = Basis(mean=t["mean"], components=t["components"])
    except (FileNotFoundError, SafetensorError, KeyError, OSError) as exc:
        raise MissingReference(f"cannot read the drift basis {path}: {exc}") from None
    if basis.mean.ndim != 1 or basis.components.ndim != 2 or basis.components.shape[1] != basis.mean.shape[0]:
        raise MissingReference(f"drift basis {path} is malformed: mean {tuple(basis.mean.shape)}, "
                               f"components {tuple(basis.components.shape)}")
    return basis


# ---- per-request features ---------------------------------------------------------------------


def _entropy(scores: torch.Tensor) -> torch.Tensor:
    """(N, n, U) -> (N,): per-layer softmax entropy / log(U), mean over layers."""
    logp = torch.log_softmax(scores.float(), dim=-1)
    ent = -(logp.exp() * logp).sum(-1) / math.log(scores.shape[-1])
    return ent.mean(-1)


def _keep_margin(heads: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """(N, n, H) -> (N,): (lowest kept - highest skipped) / (std + eps) at sparsity 0.5, mean
    over layers."""
    h = heads.float()
    kept = masks.keep_count(h.shape[-1], MARGIN_SPARSITY)
    if kept >= h.shape[-1]:  # one head per layer: nothing is ever skipped
        return torch.full(h.shape[:1], float("nan"))
    top = h.topk(kept + 1, dim=-1).values  # (N, n, kept+1), descending
    gap = top[..., kept - 1] - top[..., kept]
    return (gap / (h.std(-1) + eps)).mean(-1)


def feature_rows(basis: Basis, predictor_inputs: torch.Tensor, prompt_lens: list[int],
                 head_scores: torch.Tensor | None = None,
                 neuron_scores: torch.Tensor | None = None) -> list[dict[str, float]]:
    """One feature row per request.

    predictor_inputs (N, D) RAW (the basis applies min-max); prompt_lens N token counts;
    head_scores (N, n, H) and neuron_scores (N, n, F) the predictor's raw outputs, or None.

    - pcXX: project(basis, predictor_inputs).
    - head_entropy: per gated layer, softmax over that layer's H predicted head scores, its
      entropy divided by log(H) (1.0 = all heads scored alike); mean over the n layers.
      neuron_entropy: the same over the F neuron scores.
    - keep_margin: per gated layer, keep the top half of the heads (fixed sparsity 0.5,
      masks.keep_count); (lowest kept score - highest skipped score) / (std of the layer's
      H scores + 1e-6); mean over layers. Near 0: the ranking at the cut is a coin toss.
    - With head_scores None (e.g. served dense, no predictor run) head_entropy and
      keep_margin are NaN; with neuron_scores None, neuron_entropy is NaN.
    """
    pcs = project(basis, predictor_inputs)
    n = pcs.shape[0]
    if len(prompt_lens) != n:
        raise ValueError(f"{n} predictor inputs but {len(prompt_lens)} prompt lengths")
    nan = torch.full((n,), float("nan"))
    he = nan if head_scores is None else _entropy(head_scores.cpu())
    km = nan if head_scores is None else _keep_margin(head_scores.cpu())
    ne = nan if neuron_scores is None else _entropy(neuron_scores.cpu())
    table = torch.cat([pcs, torch.tensor(prompt_lens, dtype=torch.float32)[:, None],
                       torch.stack([he, ne, km], 1)], 1).double().numpy()
    cols = feature_columns(basis.k)
    return [dict(zip(cols, row)) for row in table.tolist()]


@torch.no_grad()
def scores_for(loaded_predictor, predictor_inputs: torch.Tensor):
    """heads (N, n, H), neurons (N, n, F) of a shadowllm predictor; (None, None) for other
    kinds (dejavu scores per token and layer, static has no per-request scores)."""
    if loaded_predictor is None or loaded_predictor.kind != "shadowllm":
        return None, None
    module = loaded_predictor.module
    param = next(module.parameters())
    u = predictor_inputs.reshape(-1, module.shape.hidden).to(param.device, param.dtype)
    heads, neurons = module(u)
    return heads.float().cpu(), neurons.float().cpu()


# ---- a version's reference ----------------------------------------------------------------------


def reference_prompts(families: list[str] | None = None, per_family: int = 200) -> list[str]:
    """Training-split prompts of the suite (the data the predictors are trained on)."""
    from adapter.embedded import suite as tasks

    unknown = set(families or ()) - set(tasks.FAMILIES)
    if unknown:
        raise ValueError(f"unknown task families {sorted(unknown)}; known: {list(tasks.FAMILIES)}")
    keep = set(families or tasks.FAMILIES)
    return [inst.prompt for inst in tasks.split("train", per_family) if inst.family in keep]


def request_inputs(runtime, tokenizer, prompts: list[str], progress: bool = True):
    """Predictor inputs (N, D) and prompt lengths of prompts tokenised as the service does:
    tokenizer.encode(prompt), which for the embedded tokenizer prepends <bos> (its
    post-processor), giving the same ids the traces were collected on. Only layer 0 runs."""
    inputs, lens = [], []
    for prompt in tqdm(prompts, desc="drift reference", unit="prompt", disable=not progress):
        ids = tokenizer.encode(prompt)
        inputs.append(runtime.predictor_input(ids).float().cpu())
        lens.append(len(ids))
    return torch.stack(inputs), lens


def build_reference(runtime, tokenizer, loaded_predictor, prompts: list[str], k: int = 16,
                    batch_size: int = 64, progress: bool = True) -> tuple[Basis, pd.DataFrame]:
    """Basis fitted on the prompts' predictor inputs and their feature rows (N, k + 4)."""
    inputs, lens = request_inputs(runtime, tokenizer, prompts, progress)
    basis = fit_basis(inputs, k)
    rows: list[dict[str, float]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = inputs[start:start + batch_size]
        heads, neurons = scores_for(loaded_predictor, chunk)
        rows += feature_rows(basis, chunk, lens[start:start + batch_size], heads, neurons)
    return basis, pd.DataFrame(rows, columns=feature_columns(k))


def write_reference(folder: Path, basis: Basis, rows: pd.DataFrame) -> Path:
    """Writes folder/reference/{features.parquet, basis.safetensors}; returns reference/."""
    missing = [c for c in feature_columns(basis.k) if c not in rows.columns]
    if missing:
        raise ValueError(f"reference rows lack the feature columns {missing}")
    out = Path(folder) / REFERENCE_DIR
    out.mkdir(parents=True, exist_ok=True)
    rows.reset_index(drop=True).to_parquet(out / FEATURES_FILE, index=False)
    save_basis(basis, out / BASIS_FILE)
    return out


def load_reference(folder: Path) -> tuple[Basis, pd.DataFrame]:
    ref = Path(folder) / REFERENCE_DIR
    if not (ref / FEATURES_FILE).exists() or not (ref / BASIS_FILE).exists():
        raise MissingReference(f"{folder} holds no drift reference ({REFERENCE_DIR}/{FEATURES_FILE} "
                               f"and {REFERENCE_DIR}/{BASIS_FILE})")
    basis = load_basis(ref / BASIS_FILE)
    try:
        rows = pd.read_parquet(ref / FEATURES_FILE)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise MissingReference(f"cannot read the drift reference {ref / FEATURES_FILE}: {exc}") from None
    missing = [c for c in feature_columns(basis.k) if c not in rows.columns]
    if missing or rows.empty:
        raise MissingReference(f"drift reference {ref} is incomplete: {len(rows)} rows, missing {missing}")
    return basis, rows


# ---- the Evidently check ----------------------------------------------------------------------


@dataclass(frozen=True)
class DriftResult:
    drift: bool  # Evidently's dataset decision: share of drifted columns >= drift_share
    share: float
    drifted_count: int
    n_columns: int
    columns: dict[str, dict]  # column -> {score, method, threshold, drifted}
    n_reference: int
    n_current: int
    drift_share: float = 0.5
    skipped_columns: tuple[str, ...] = ()  # all-NaN in reference or current: not tested
    html: str | None = field(default=None, repr=False)

    @property
    def drifted_columns(self) -> list[str]:
        return [c for c, v in self.columns.items() if v["drifted"]]

    def as_dict(self) -> dict:
        out = asdict(self)
        out.pop("html")
        out["skipped_columns"] = list(self.skipped_columns)
        return out


def _column_drifted(score: float, method: str, threshold: float) -> bool:
    """Evidently's rule for its default methods (K-S, chi-square, Z: p-values, drift below
    the threshold; Wasserstein, Jensen-Shannon: distances, drift at or above it). Only a
    fallback: the per-column test status is Evidently's own decision for every method."""
    return score < threshold if "p_value" in method else score >= threshold


def _display_name(method: str) -> str:
    """A forced method appears in the report config by its registry name ("ks"); report the
    name Evidently shows for an auto-chosen one ("K-S p_value") either way."""
    from evidently.legacy.calculations.stattests.registry import StatTestNotFoundError, get_registered_stattest
    from evidently.legacy.core import ColumnType

    try:
        return get_registered_stattest(method, ColumnType.Numerical).display_name
    except StatTestNotFoundError:
        return method


def check_drift(reference: pd.DataFrame, current: pd.DataFrame, columns: list[str] | None = None,
                html: bool = False, drift_share: float = 0.5, method: str | None = None,
                threshold: float | None = None) -> DriftResult:
    """Evidently DataDriftPreset of `current` against `reference` on `columns` (default: the
    numeric columns both frames share). `method` None lets Evidently choose per column
    (K-S p-value up to 1,000 reference rows, normed Wasserstein above; chi-square / Jensen-
    Shannon for <= 5 distinct values); "ks", "wasserstein", ... force one, and `threshold`
    replaces the method's default threshold (0.05 for p-values, 0.1 for distances)."""
    from evidently import DataDefinition, Dataset, Report
    from evidently.presets import DataDriftPreset

    if columns is None:
        columns = [c for c in reference.columns
                   if c in current.columns and pd.api.types.is_numeric_dtype(reference[c])]
    absent = [c for c in columns if c not in reference.columns or c not in current.columns]
    if absent:
        raise ValueError(f"columns {absent} are not in both the reference and the current rows")
    # Evidently cannot test a column with no values on one side (dense-served requests have
    # no predictor scores): drop it and say so.
    skipped = tuple(c for c in columns if reference[c].isna().all() or current[c].isna().all())
    cols = [c for c in columns if c not in skipped]
    if not cols:
        raise ValueError(f"no testable columns: every one of {list(columns)} is all-NaN on one side")
    definition = DataDefinition(numerical_columns=cols)
    ref_ds = Dataset.from_pandas(reference[cols].astype("float64"), data_definition=definition)
    cur_ds = Dataset.from_pandas(current[cols].astype("float64"), data_definition=definition)
    preset = DataDriftPreset(columns=cols, drift_share=drift_share, method=method, threshold=threshold)
    snapshot = Report([preset], include_tests=True).run(current_data=cur_ds, reference_data=ref_ds)
    snap = snapshot.dict()

    status = {t["metric_config"]["metric_id"]: t["status"] for t in snap.get("tests", [])}
    per_column: dict[str, dict] = {}
    count = share = dataset_fail = None
    for m in snap["metrics"]:
        kind = m["config"]["type"]
        if kind.endswith(":DriftedColumnsCount"):
            count, share = int(m["value"]["count"]), float(m["value"]["share"])
            dataset_fail = status.get(m["id"])  # the preset's "share < drift_share" test
        elif kind.endswith(":ValueDrift"):
            cfg, score = m["config"], float(m["value"])
            name, flag = _display_name(cfg["method"]), status.get(m["id"])
            drifted = flag == "FAIL" if flag is not None else _column_drifted(score, name, cfg["threshold"])
            per_column[cfg["column"]] = {"score": score, "method": name,
                                         "threshold": float(cfg["threshold"]), "drifted": drifted}
    if count is None:
        raise RuntimeError("Evidently's report has no DriftedColumnsCount metric")
    drift = dataset_fail == "FAIL" if dataset_fail is not None else share >= drift_share
    return DriftResult(drift=bool(drift), share=share, drifted_count=count, n_columns=len(cols),
                       columns=per_column, n_reference=len(reference), n_current=len(current),
                       drift_share=drift_share, skipped_columns=skipped,
                       html=snapshot.get_html_str(as_iframe=False) if html else None)

