"""What structures cost: parameters (or FLOPs per token) of a head, a KV head, an FFN neuron, and of the layers.

Budgets are stated over the prunable layers (attention, FFN and norms of every layer; embeddings, the LM
head and the classifier are outside them), so every cost here is in that unit. Selection (selection.py)
ranks structures by score per cost; plan.py measures a plan's exact cost on a weightless copy.
"""

from __future__ import annotations

from torch import nn

from prunetune.families import input_norms, layer_sites


def numel(linear: nn.Module) -> tuple[int, int, bool]:
    """Output width, input width and whether there is a bias, of a (possibly LoRA-wrapped) linear."""
    # a LoRA-wrapped linear (PEFT's tuner layers) answers .weight and .bias with its base layer's
    return linear.weight.shape[0], linear.weight.shape[1], linear.bias is not None


def layer_param_count(model: nn.Module) -> int:
    """Parameters in the prunable layers (attention, FFN and norms of every layer; no embeddings or heads).

    LoRA adapters are not counted: a budget is about the base model.
    """
    total = 0
    for lay in layer_sites(model):
        total += sum(p.numel() for n, p in lay.module.named_parameters() if "lora_" not in n)
    return total


def head_costs(site, hidden_scale: float = 1.0, flops_seq: int | None = None) -> tuple[float, float]:
    """Cost of one query head and of one KV head (k and v rows) of this site.

    `hidden_scale`: the fraction of hidden dims kept, which shrinks every weight's hidden side (biases and
    the attention's sequence FLOPs stay).
    """
    hd = site.head_dim
    _, q_in, q_bias = numel(site.proj("q"))
    o_out, _, _ = numel(site.proj("o"))
    per_q = hd * (q_in * hidden_scale + q_bias) + hd * o_out * hidden_scale
    _, k_in, k_bias = numel(site.proj("k"))
    per_kv = 2 * hd * (k_in * hidden_scale + k_bias)
    if not site.spec.kv_groups_attr:
        per_q, per_kv = per_q + per_kv, 0.0  # MHA: a head owns its k and v rows
    if flops_seq:
        # per token: 2 FLOPs a weight, plus q.k and attn.v over the sequence
        per_q = 2 * per_q + 4 * flops_seq * hd
        per_kv = 2 * per_kv
    return per_q, per_kv


def neuron_cost(ffn, hidden_scale: float = 1.0, flops_seq: int | None = None) -> float:
    """Cost of one FFN neuron: its row (and bias) in every input projection, its column in the output one."""
    cost = 0.0
    for lin in ffn.inputs:
        _, n_in, bias = numel(lin)
        cost += n_in * hidden_scale + bias
    out, _, _ = numel(ffn.output)
    cost += out * hidden_scale
    return 2 * cost if flops_seq else cost


def input_norm_costs(model: nn.Module) -> dict[str, float]:
    """Parameters of the norm each sublayer of a pre-norm stack reads through, by block key ("<site key>",
    "<layer>/ffn"): what removing that block whole also removes (surgery drops the norm of an empty sublayer).
    All of it scales with the hidden size. Post-norm stacks (BERT) have none."""
    return {key: float(sum(p.numel() for p in norm.parameters()))
            for lay in layer_sites(model) for key, (_, norm) in input_norms(lay).items()}


def layer_cost(model: nn.Module, flops_seq: int | None = None) -> float:
    """Parameters (or FLOPs per token at `flops_seq`) of the prunable layers, by the same model as selection."""
    if not flops_seq:
        return float(layer_param_count(model))
    total = 0.0
    for lay in layer_sites(model):
        for site in lay.attentions.values():
            if site.num_heads:
                q, kv = head_costs(site, 1.0, flops_seq)
                total += q * site.num_heads + kv * site.num_kv_heads
        total += neuron_cost(lay.ffn, 1.0, flops_seq) * lay.ffn.width
    return total


__all__ = ["head_costs", "input_norm_costs", "layer_cost", "layer_param_count", "neuron_cost", "numel"]
