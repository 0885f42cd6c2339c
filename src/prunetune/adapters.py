"""LoRA through PEFT: which linears get adapters, rank-varied patterns, what trains, growth and merging.

PEFT does the injection (module replacement, ``rank_pattern`` for varied ranks, merging); prunetune adds
what PEFT has no notion of: adapters on a physically pruned base (surgery slices ``lora_A``/``lora_B``,
see surgery.py), growing an adapter's rank mid-training (APT), and refusing to load an adapter onto a
base of another shape (PEFT would silently do nothing, PEFT issue 1746).
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from prunetune.errors import PrunetuneError
from prunetune.families import all_norms, base_model, layer_sites, out_width, unwrap

ADAPTER = "default"


@contextmanager
def quiet_peft(model: nn.Module | None = None):
    """Silence the warnings PEFT causes that are noise here, and only those.

    - PeftModel's constructor reads ``model.is_gradient_checkpointing``, an alias transformers 5 deprecated
      (a FutureWarning on every LoRA run that no caller can act on; PEFT must move to
      ``is_activation_checkpointing``).
    - Saving warns that zero-sized lora_A/lora_B tensors mean unsharded DeepSpeed ZeRO-3 / FSDP weights. Here
      they are adapters on an attention block or FFN that pruning emptied (APT, lora-prune): prunetune does
      not shard, so when every LoRA tensor is 2-D (a shard flattened by ZeRO-3 would be 1-D) the warning is
      wrong and is dropped; otherwise it is let through.
    - Loading such an adapter, PEFT initialises the (r, 0) lora_A of an emptied projection and torch warns that
      initialising a zero-element tensor does nothing, which is exactly right there.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        warnings.filterwarnings("ignore", message=r"Initializing zero-element tensors is a no-op")
        lora = [p for n, p in model.named_parameters() if "lora_" in n] if model is not None else []
        if lora and all(p.dim() == 2 for p in lora):
            warnings.filterwarnings("ignore", message=r"Adapter .* LoRA tensor\(s\) have invalid shape")
        yield


# attention: q/k/v/o (LoRA, Pruning-Adapter). ffn-in: also the FFN's input projection(s). all: also its output
# projection, whose input (the FFN's widest activation) an adapter must then keep for the backward pass.
LORA_TARGETS = ("attention", "ffn-in", "all")


def lora_targets(model: nn.Module, which: str = "attention") -> dict[str, list[str]]:
    """Full module names of the linears that get adapters, by layer key.

    ``attention``: q/k/v/o; ``ffn-in``: those and the FFN's input projection(s); ``all``: also its output
    projection. Sites with no head left and FFNs with no neuron left are skipped (a zero-width adapter would
    train nothing).
    """
    if which not in LORA_TARGETS:
        raise PrunetuneError(f"unknown LoRA targets {which!r}; known: {', '.join(LORA_TARGETS)}")
    top = unwrap(model)
    names = {id(m): n for n, m in top.named_modules()}
    out: dict[str, list[str]] = {}
    for lay in layer_sites(top):
        mods = []
        for site in lay.attentions.values():
            if site.num_heads:
                mods += [site.proj(w) for w in ("q", "k", "v", "o")]
        if which != "attention" and lay.ffn.width:
            mods += [*lay.ffn.inputs, *([lay.ffn.output] if which == "all" else [])]
        for mod in mods:
            if mod is not None and out_width(mod) > 0:
                out.setdefault(lay.key, []).append(names[id(mod)])
    return out


def block_ranks(block_scores: dict[str, float], top_k: int, high: int, low: int) -> dict[str, int]:
    """Rank-varied LoRA (Pruning-Adapter): the k most important blocks get `high`, the others `low`."""
    if high <= 0 or low <= 0:
        raise PrunetuneError("LoRA ranks must be positive")
    best = sorted(block_scores, key=lambda k: -block_scores[k])[: max(0, top_k)]
    return {k: (high if k in best else low) for k in block_scores}


def apply_lora(
    model: nn.Module,
    *,
    rank: int = 8,
    alpha: float | None = None,
    dropout: float = 0.0,
    block_rank: dict[str, int] | None = None,
    train_norms: bool = True,
    train_head: bool = True,
    targets: str = "attention",
):
    """Wrap the model with LoRA on q/k/v/o (`targets="all"`: and the FFN; per-block ranks via PEFT's
    rank_pattern); freeze the rest.

    Trainable afterwards: the adapters, and optionally every norm and the task head (Pruning-Adapter's
    setting). `alpha` defaults to 2 x rank, so scaling = 2 whatever the rank.
    """
    from peft import LoraConfig, get_peft_model

    if rank <= 0:
        raise PrunetuneError("LoRA rank must be positive")
    target_names = lora_targets(model, targets)
    names = [n for v in target_names.values() for n in v]
    if not names:
        raise PrunetuneError(f"no {targets} projection left to put LoRA on")
    rank_pattern, alpha_pattern = {}, {}
    for key, r in (block_rank or {}).items():
        for n in target_names.get(key, []):
            rank_pattern[n] = r
            alpha_pattern[n] = 2 * r if alpha is None else alpha
    config = LoraConfig(
        r=rank,
        lora_alpha=2 * rank if alpha is None else alpha,
        lora_dropout=dropout,
        target_modules=names,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        bias="none",
    )
    with quiet_peft():
        peft_model = get_peft_model(model, config)
    set_trainable(peft_model, norms=train_norms, head=train_head, lora=True)
    return peft_model


def head_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The task head: parameters outside the backbone that are not tied to an embedding."""
    top = unwrap(model)
    backbone = {id(p) for p in base_model(top).parameters()}
    return [p for p in top.parameters() if id(p) not in backbone and "lora" not in type(p).__name__]


def set_trainable(model: nn.Module, *, norms: bool, head: bool, lora: bool = True, all_params: bool = False) -> None:
    """Freeze everything, then unfreeze the chosen groups."""
    for n, p in model.named_parameters():
        p.requires_grad_(all_params or (lora and "lora_" in n))
    if norms:
        for norm in all_norms(model):
            for p in norm.parameters():
                p.requires_grad_(True)
    if head:
        for p in head_parameters(model):
            p.requires_grad_(True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameters; LoRA adapters count in both."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return total, trainable


def base_layer(module: nn.Module) -> nn.Module:
    """The linear a LoRA wrapper wraps (PEFT's get_base_layer), or the module itself when it is not wrapped: the
    one place the rest of prunetune learns whether a linear carries adapters."""
    get = getattr(module, "get_base_layer", None)
    return get() if callable(get) else module


def lora_factors(module: nn.Module) -> list[tuple[nn.Module, nn.Module]]:
    """(A, B) linears of every adapter on a LoRA-wrapped linear (A reads the input, B writes the output); none
    on a plain linear."""
    a, b = getattr(module, "lora_A", None), getattr(module, "lora_B", None)
    if a is None or b is None:
        return []
    return [(a[name], b[name]) for name in a if name in b]


def active_delta(module: nn.Module) -> torch.Tensor | None:
    """B @ A x scaling summed over the active, unmerged adapters of a wrapped linear (float32), None when there
    is nothing to add (a plain linear, merged adapters)."""
    if not lora_factors(module) or getattr(module, "merged", False):
        return None
    active = set(getattr(module, "active_adapters", list(module.lora_A)))
    delta = None
    for name in module.lora_A:
        if name in active and name in module.lora_B:
            d = module.lora_B[name].weight.detach().float() @ module.lora_A[name].weight.detach().float()
            d = d * module.scaling[name]
            delta = d if delta is None else delta + d
    return delta


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every adapter parameter of a model (what a LoRA run trains besides norms and the head)."""
    return [p for n, p in model.named_parameters() if "lora_" in n]


def lora_layers(model: nn.Module) -> dict[str, nn.Module]:
    """PEFT LoRA-wrapped linears by full module name."""
    return {n: m for n, m in model.named_modules() if hasattr(m, "lora_A") and ADAPTER in m.lora_A}


def merge(model: nn.Module) -> nn.Module:
    """Fold the adapters into the (possibly pruned) weights: inference then costs no adapter time.

    The merged model's config records the fingerprint of the base the adapter was trained on (MERGED_ATTR),
    so that load_adapter refuses to apply the same adapter a second time onto the merged model.
    """
    if hasattr(model, "merge_and_unload"):
        before = base_fingerprint(model)
        merged = model.merge_and_unload()
        setattr(unwrap(merged).config, MERGED_ATTR, before["sha256"])
        # peft < 0.19 leaves its config on the unwrapped model; a plain model must not look like a PEFT one
        # (save_pretrained and is-this-an-adapter checks read that attribute).
        if "peft_config" in vars(merged):
            del merged.peft_config
        return merged
    return model


def grow_rank(layer: nn.Module, new_rank: int, log=None, generator: torch.Generator | None = None) -> bool:
    """Give a LoRA layer more rank without changing its function (APT's adaptive tuning).

    New rows of A are initialised like PEFT's (Kaiming), new columns of B are zero, so B @ A is unchanged;
    the scaling is kept as it was (alpha / r would shrink the existing directions). `log`, a SliceLog,
    records the growth so the optimizer's state can be extended with zeros. `generator` (a CPU one) draws the
    new rows; without it, torch's global generator does.
    """
    a, b = layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]
    r = a.weight.shape[0]
    if new_rank <= r:
        return False
    extra = new_rank - r
    # drawn on the CPU, in float32, whatever the device: the same rows on every device and rank
    new_a = torch.empty(extra, a.weight.shape[1])
    nn.init.kaiming_uniform_(new_a, a=math.sqrt(5), generator=generator)
    new_a = new_a.to(a.weight.device, a.weight.dtype)
    grown_a = nn.Parameter(torch.cat([a.weight.detach(), new_a], 0), requires_grad=a.weight.requires_grad)
    zeros_b = torch.zeros(b.weight.shape[0], extra, dtype=b.weight.dtype, device=b.weight.device)
    grown_b = nn.Parameter(torch.cat([b.weight.detach(), zeros_b], 1), requires_grad=b.weight.requires_grad)
    if log is not None:
        log.record_growth(a.weight, grown_a, 0, r)
        log.record_growth(b.weight, grown_b, 1, r)
    a.weight, b.weight = grown_a, grown_b
    a.out_features, b.in_features = new_rank, new_rank
    layer.r[ADAPTER] = new_rank
    return True


def lora_rank(layer: nn.Module) -> int:
    return layer.lora_A[ADAPTER].weight.shape[0]


def lora_weights(layer: nn.Module) -> tuple[nn.Parameter, nn.Parameter]:
    """(A, B) of a LoRA layer: A is (rank, in), B is (out, rank); the update is B @ A x scaling."""
    return layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight


def shape_fingerprint(model: nn.Module) -> dict[str, list[int]]:
    """Shapes of the base weights, so an adapter is only ever loaded onto the base it was trained on."""
    top = unwrap(model)
    return {n.replace(".base_layer", ""): list(p.shape) for n, p in top.named_parameters() if "lora_" not in n}


BASE_FILE = "prunetune_base.json"  # next to a saved adapter: the identity of the base it belongs to
MERGED_ATTR = "prunetune_merged_adapter"  # config of a merged model: the fingerprint of the base before merging


def _base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Base weights by name, LoRA wrapping removed (the names a plain, unwrapped base has)."""
    return {n.replace(".base_layer", ""): p for n, p in unwrap(model).named_parameters() if "lora_" not in n}


def base_fingerprint(model: nn.Module, names: list[str] | None = None) -> dict:
    """A hash of a few base weights: by default those of the first, middle and last linear with an adapter.

    Merging changes exactly those weights, and a base of the right shapes but other weights (another run's,
    another checkpoint's) has other values there: shapes alone told neither apart.
    """
    tensors = _base_tensors(model)
    if names is None:
        wrapped = sorted(f"{n}.weight" for n, m in unwrap(model).named_modules() if hasattr(m, "lora_A"))
        names = sorted({wrapped[i] for i in (0, len(wrapped) // 2, len(wrapped) - 1)} if wrapped else set())
    digest = hashlib.sha256()
    dtype = None
    for name in names:
        if name not in tensors:
            return {"tensors": names, "sha256": None, "dtype": None}
        t = tensors[name].detach()
        dtype = str(t.dtype).removeprefix("torch.")
        digest.update(name.encode())
        digest.update(t.to("cpu", torch.float32).contiguous().numpy().tobytes())
    return {"tensors": names, "sha256": digest.hexdigest(), "dtype": dtype}


TRAINED_BASE_FILE = "prunetune_trainable.safetensors"


def _record_grown_ranks(model: nn.Module) -> None:
    """Write the live ranks of grown adapters into the PEFT config, with alphas that keep their scaling.

    Fix: grow_rank changes the tensors but PEFT's config kept the starting rank, so an adapter saved after
    APT's rank growth could not be loaded (PEFT built rank-r layers and refused the larger tensors).
    """
    config = getattr(model, "peft_config", {}).get(ADAPTER)
    if config is None:
        return
    names = {id(m): n for n, m in unwrap(model).named_modules()}
    for layer in lora_layers(model).values():
        name, r = names[id(layer)], lora_rank(layer)
        if r != config.rank_pattern.get(name, config.r):
            config.rank_pattern[name] = r
            config.alpha_pattern[name] = layer.scaling[ADAPTER] * r  # PEFT: scaling = alpha / r


def trained_base_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable tensors outside the adapters (norms, task head), named as in the unwrapped model."""
    top = unwrap(model)
    return {n: p.detach().cpu().clone().contiguous() for n, p in top.named_parameters()
            if p.requires_grad and "lora_" not in n}


def save_adapter(model: nn.Module, out: Path, *, base_model: str | None = None) -> None:
    """PEFT's adapter format plus the identity of the pruned base it belongs to (BASE_FILE).

    The identity: the base's shapes, a fingerprint of its weights before merging, and how to rebuild it (the
    dense `base_model` and the layout that cuts it to the base; see pruned_base). Fix: the norms and the task
    head train alongside LoRA (apply_lora's default) but PEFT saves only the ``lora_`` tensors (they are not
    ``modules_to_save``), so a loaded adapter ran with the untrained head and norms. They are now saved next
    to the adapter and load_adapter puts them back.
    """
    from safetensors.torch import save_file

    from prunetune.surgery import current_layout

    out = Path(out)
    _record_grown_ranks(model)
    with quiet_peft(model):
        model.save_pretrained(out)
    layout = current_layout(model)
    record = {
        "shapes": shape_fingerprint(model),
        "fingerprint": base_fingerprint(model),
        "merged": False,  # the fingerprint is of the base before the adapter is merged into it
        "base": {"model": base_model, "layout": layout.to_dict() if layout else None},
    }
    (out / BASE_FILE).write_text(json.dumps(record))
    extra = trained_base_tensors(model)
    if extra:
        save_file(extra, str(out / TRAINED_BASE_FILE))
    dense = f"the dense model {base_model}" if base_model else "the dense model it was trained from"
    (out / "README.md").write_text(
        "PEFT LoRA adapter, unmerged. It fits only the base it was trained on: "
        f"{dense}, cut to the layout in {BASE_FILE}, before merging. A merged model next to it already contains "
        "it. Rebuild the base with prunetune.adapters.pruned_base(dense, dir), then "
        "prunetune.adapters.load_adapter(base, dir), which checks the base against prunetune_base.json.\n"
    )


def _read_base_record(adapter_dir: Path) -> dict:
    try:
        return json.loads((adapter_dir / BASE_FILE).read_text())
    except (OSError, ValueError) as e:
        raise PrunetuneError(f"{adapter_dir} is not a prunetune adapter (cannot read {BASE_FILE}: {e})") from e


def _how_to_get_the_base(record: dict, adapter_dir: Path) -> str:
    """What to load instead, in words that are true for this adapter directory."""
    dense = (record.get("base") or {}).get("model")
    text = (f"it belongs to the dense model {dense}" if dense else "it belongs to the dense model it was trained from")
    if (record.get("base") or {}).get("layout"):
        text += f" cut to the layout in {adapter_dir / BASE_FILE}, before merging"
    text += "; rebuild that base with prunetune.adapters.pruned_base(dense_model, adapter_dir)"
    merged = adapter_dir.parent / "model"
    if (merged / "config.json").exists():
        text += f" (the merged model {merged} already contains the adapter: use it as it is)"
    return text


def pruned_base(dense: nn.Module, adapter_dir: str | Path) -> nn.Module:
    """The base a saved adapter was trained on, rebuilt in place from the dense model it started from."""
    from prunetune.plan import PruningPlan
    from prunetune.surgery import apply_plan, current_layout

    adapter_dir = Path(adapter_dir)
    layout = (_read_base_record(adapter_dir).get("base") or {}).get("layout")
    if current_layout(dense) is not None:
        raise PrunetuneError("pruned_base needs the dense model (this one is already pruned)")
    if layout:
        with torch.no_grad():
            apply_plan(dense, PruningPlan.from_dict(layout))
    return dense


def load_adapter(base: nn.Module, adapter_dir: str | Path):
    """Load a saved adapter onto `base`, refusing any base but the one it was trained on.

    Refused: other shapes; the model the adapter was merged into (it would apply twice); other weights.
    """
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    record = _read_base_record(adapter_dir)
    meta = record["shapes"]
    have = shape_fingerprint(base)
    if have != meta:
        differing = [n for n in meta if have.get(n) != meta[n]] or sorted(set(have) - set(meta))
        raise PrunetuneError(
            f"adapter {adapter_dir} was trained on a base of other shapes (e.g. {differing[:1]}); "
            + _how_to_get_the_base(record, adapter_dir)
        )
    fingerprint = record.get("fingerprint")  # adapters saved before it was recorded have shapes only
    if fingerprint and fingerprint.get("sha256"):
        if getattr(unwrap(base).config, MERGED_ATTR, None) == fingerprint["sha256"]:
            raise PrunetuneError(
                f"adapter {adapter_dir} is already merged into this model; loading it would apply it twice. "
                + _how_to_get_the_base(record, adapter_dir)
            )
        now = base_fingerprint(base, fingerprint["tensors"])
        if now["sha256"] != fingerprint["sha256"]:
            dtypes = (f" (the base is {now['dtype']}, the adapter's base was {fingerprint['dtype']})"
                      if now["dtype"] != fingerprint["dtype"] else "")
            raise PrunetuneError(
                f"adapter {adapter_dir} was trained on a base with other weights{dtypes}; "
                + _how_to_get_the_base(record, adapter_dir)
            )
    trained = adapter_dir / TRAINED_BASE_FILE
    if trained.exists():  # the norms / head trained with the adapter (see save_adapter)
        from safetensors.torch import load_file

        params = dict(unwrap(base).named_parameters())
        with torch.no_grad():
            for n, v in load_file(str(trained)).items():
                params[n].copy_(v.to(params[n].device, params[n].dtype))
    with quiet_peft():
        return PeftModel.from_pretrained(base, adapter_dir)
