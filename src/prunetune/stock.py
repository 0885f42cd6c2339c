"""Stock exports of pruned models: when a plain transformers config describes the shapes, and what to write then.

A pruned model whose layers all have the same shape (``Budget.uniform``) fits the stock config of its family
with new numbers (LLaMA/Mistral/Qwen2: ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
``intermediate_size``, ``hidden_size``; T5: ``num_heads``, ``d_kv``, ``d_ff``, ``d_model``), and is then exported
as a stock checkpoint that transformers, vLLM or llama.cpp's converters load without prunetune. What can be
stock, exactly:

- every attention block keeps the same number of query heads and KV heads (at least one), and every FFN the same
  number of neurons (at least one): an emptied block has no stock form;
- the family's config validates those numbers (LLaMA's wants the hidden size a multiple of the heads) and builds
  heads of the size the model has: BERT and RoBERTa derive it from hidden / heads, so they are stock only with
  their heads and hidden size untouched;
- T5: every layer of a stack reads layer 0's relative position bias, so they must keep the same heads (the table's
  columns are cut to them).

The answer is checked, not assumed: the stock class is built from the config on the meta device and must have
exactly the parameters, of the same shapes, that are written. Anything else (biases a stock config would not
build, for instance) keeps the prunetune export, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import transformers
from torch import nn

from prunetune.families import family_of, get, hidden_size, layer_sites, stock_config, unwrap
from prunetune.surgery import current_layout


@dataclass
class StockForm:
    """What a stock export writes: the stock config and the weights (the model's own, but for cut bias tables)."""

    config: transformers.PretrainedConfig
    state_dict: dict[str, torch.Tensor]


def _uniform_counts(model: nn.Module) -> dict | str:
    layers = layer_sites(model)
    sites = [s for lay in layers for s in lay.attentions.values()]
    heads = sorted({(s.num_heads, s.num_kv_heads) for s in sites})
    widths = sorted({lay.ffn.width for lay in layers})
    if len(heads) > 1:
        return ("the layers keep different numbers of attention heads ("
                + ", ".join(f"{q} query/{kv} KV" for q, kv in heads) + ")")
    if len(widths) > 1:
        return f"the layers keep different FFN widths ({', '.join(map(str, widths))})"
    if not heads or heads[0][0] == 0:
        return "an attention block has no head left"
    if widths[0] == 0:
        return "an FFN has no neuron left"
    return {"hidden": hidden_size(model), "heads": heads[0][0], "kv_heads": heads[0][1], "ffn": widths[0],
            "head_dim": sites[0].head_dim}


def _position_bias_tables(model: nn.Module) -> list[tuple[nn.Module, list[int]]] | str:
    """T5: per stack, layer 0's bias table and the (original) heads every layer of the stack keeps."""
    top = unwrap(model)
    source = family_of(top).position_bias_source
    if not source:
        return []
    layout = current_layout(top)
    by_stack: dict[str, list] = {}
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if site.spec.position_bias:
                by_stack.setdefault(f"{lay.stack.name}/{site.spec.name}", []).append(site)
    tables = []
    for name, sites in by_stack.items():
        table = get(sites[0].module, source)
        if table is None:
            continue  # cross-attention: no table, a zero bias
        kept = [tuple(layout.heads.get(s.key, range(table.weight.shape[1]))) if layout else
                tuple(range(table.weight.shape[1])) for s in sites]
        if len(set(kept)) > 1:
            return (f"the {name} attention of every layer reads layer 0's relative position bias, so a stock config "
                    "needs the same heads kept in every layer; these layers keep different ones")
        tables.append((table, list(kept[0])))
    return tables


def stock_form(model: nn.Module) -> StockForm | str:
    """The stock config and weights of a pruned model, or why it has none (one line)."""
    top = unwrap(model)
    counts = _uniform_counts(top)
    if isinstance(counts, str):
        return counts
    config = stock_config(top.config, counts)
    if isinstance(config, str):
        return config
    tables = _position_bias_tables(top)
    if isinstance(tables, str):
        return tables
    state = top.state_dict(keep_vars=True)
    for table, kept in tables:
        key = next(k for k, v in state.items() if v is table.weight)
        state[key] = table.weight[:, kept]
    state = {k: v.detach() for k, v in state.items()}
    arch = type(top).__name__.removeprefix("Prunetune")
    config.architectures = [arch]
    cls = getattr(transformers, arch, None)
    if cls is None:
        return f"transformers has no class {arch}"
    with torch.device("meta"):
        ref = cls(config)
    want = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    have = {k: tuple(v.shape) for k, v in state.items()}
    for k in sorted(set(want) | set(have)):
        if want.get(k) != have.get(k):
            return (f"the stock {arch} built from that config has {k} "
                    f"{'of shape ' + str(want[k]) if k in want else 'absent'}, the model "
                    f"{'of shape ' + str(have[k]) if k in have else 'none'}")
    return StockForm(config, state)


def stock_reason(model: nn.Module) -> str | None:
    """Why a pruned model needs prunetune to load (None: a stock config describes it, or nothing was pruned)."""
    if current_layout(unwrap(model)) is None:
        return None
    form = stock_form(model)
    return form if isinstance(form, str) else None


__all__ = ["StockForm", "stock_form", "stock_reason"]
