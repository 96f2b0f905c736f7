"""``compile_sparse.export``: a physically smaller checkpoint from a pruning Plan.

The model's Linear modules are replaced by smaller ones (the kept rows / columns, the plan's
compensation biases), then saved with ``save_pretrained`` (safetensors + config) beside the plan.
When the plan is uniform and the config has Llama-style size fields, the config is rewritten to
the pruned sizes, so plain ``transformers.AutoModelForCausalLM.from_pretrained`` loads it. Otherwise
the config keeps the dense sizes and ``compile_sparse.models.load(path)`` rebuilds the model and
shrinks it by the plan before loading the weights.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
import torch.nn as nn

from .plan import HeadPlan, MLPPlan, Plan, head_channels

PLAN_FILE = "compile_sparse_plan.json"


def _module(model: nn.Module, weight_name: str) -> tuple[nn.Module, str, nn.Linear]:
    """(parent, attribute, Linear) for a weight parameter name like ``model.layers.0.mlp.up_proj.weight``."""
    path = weight_name.rsplit(".", 1)[0]
    parent_path, _, attr = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    linear = getattr(parent, attr)
    if type(linear) is not nn.Linear:
        raise ValueError(f"{path} is a {type(linear).__name__}; export slices nn.Linear modules only")
    return parent, attr, linear


def _shrink(model: nn.Module, weight_name: str, keep: torch.Tensor, side: str, bias: list[float] | None = None,
            force_bias: bool = False) -> None:
    """Replace a Linear by one keeping output rows (``side="out"``) or input columns ``keep``;
    ``bias`` is added to its output; ``force_bias`` gives it a (zero) bias if it has none."""
    parent, attr, old = _module(model, weight_name)
    weight = old.weight.detach().index_select(0 if side == "out" else 1, keep)  # (out', in')
    new_bias = old.bias.detach() if old.bias is not None else None
    if new_bias is not None and side == "out":
        new_bias = new_bias.index_select(0, keep)
    if bias is not None:
        extra = torch.tensor(bias, dtype=weight.dtype, device=weight.device)
        new_bias = extra if new_bias is None else new_bias + extra
    if new_bias is None and force_bias:
        new_bias = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
    new = nn.Linear(weight.shape[1], weight.shape[0], bias=new_bias is not None, device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        new.weight.copy_(weight)
        if new_bias is not None:
            new.bias.copy_(new_bias)
    setattr(parent, attr, new)


def shrink_model(model: nn.Module, plan: Plan, all_biases: bool = False) -> nn.Module:
    """Slice ``model``'s Linear modules in place as ``plan`` says. ``all_biases`` gives every
    projection of a site a bias when any of its kind has one (what a bias flag in a config needs)."""
    mlp_bias = all_biases and any(m.bias is not None for m in plan.mlp)
    att_bias = all_biases and any(h.bias is not None for h in plan.heads)
    for m in plan.mlp:
        _shrink_mlp(model, m, mlp_bias)
    for h in plan.heads:
        _shrink_heads(model, h, att_bias)
    return model


def _shrink_mlp(model: nn.Module, m: MLPPlan, force_bias: bool) -> None:
    for name, rows in m.producer_rows().items():
        _shrink(model, name, rows, "out", force_bias=force_bias)
    _shrink(model, m.weights["down"], torch.tensor(m.keep, dtype=torch.long), "in", m.bias, force_bias=force_bias)


def _shrink_heads(model: nn.Module, h: HeadPlan, force_bias: bool) -> None:
    q_rows = head_channels(h.keep_heads, h.head_dim)
    kv_rows = head_channels(h.keep_kv_heads, h.head_dim)
    _shrink(model, h.weights["q"], q_rows, "out", force_bias=force_bias)
    for key in ("k", "v"):
        _shrink(model, h.weights[key], kv_rows, "out", force_bias=force_bias)
    _shrink(model, h.weights["o"], q_rows, "in", h.bias, force_bias=force_bias)
    attention = _module(model, h.weights["q"])[0]
    if hasattr(attention, "num_key_value_groups"):  # HF attention modules repeat KV heads by this
        attention.num_key_value_groups = len(h.keep_heads) // len(h.keep_kv_heads)


def _uniform_config(config, plan: Plan):
    """The config at the plan's pruned sizes, or None when it cannot say them (non-uniform plan,
    or a config without Llama-style size fields)."""
    if not plan.is_uniform():
        return None
    config = copy.deepcopy(config)
    if plan.mlp:
        if not hasattr(config, "intermediate_size"):
            return None
        config.intermediate_size = len(plan.mlp[0].keep)
        if any(m.bias is not None for m in plan.mlp):
            if not hasattr(config, "mlp_bias"):
                return None
            config.mlp_bias = True
    if plan.heads:
        if not all(hasattr(config, k) for k in ("num_attention_heads", "num_key_value_heads", "head_dim")):
            return None
        config.head_dim = plan.heads[0].head_dim
        config.num_attention_heads = len(plan.heads[0].keep_heads)
        config.num_key_value_heads = len(plan.heads[0].keep_kv_heads)
        if any(h.bias is not None for h in plan.heads):
            if not hasattr(config, "attention_bias"):
                return None
            config.attention_bias = True
    return config


def export(model: nn.Module, plan: Plan, path: str | Path, tokenizer=None) -> Path:
    """Write the pruned model to ``path`` (safetensors, config, the plan, the tokenizer if given);
    the model itself is not changed. Returns the folder."""
    path = Path(path)
    if not hasattr(model, "save_pretrained"):
        raise ValueError(f"export needs a transformers model (with save_pretrained), got {type(model).__name__}")
    pruned = copy.deepcopy(model)
    config = _uniform_config(model.config, plan)
    shrink_model(pruned, plan, all_biases=config is not None)
    if config is not None:
        pruned.config = config
    pruned.save_pretrained(path)
    plan.save(path / PLAN_FILE)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def load_exported(path: str | Path) -> nn.Module:
    """Load what ``export`` wrote: plainly when the config carries the pruned sizes, else rebuild
    at the dense sizes, shrink by the plan and load the weights."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    plan = Plan.load(path / PLAN_FILE)
    config = AutoConfig.from_pretrained(path)
    if _at_pruned_sizes(config, plan):
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    shrink_model(model, plan)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    missing, unexpected = model.load_state_dict(state, strict=False)
    tied = {name for name in missing if name.endswith("lm_head.weight") and getattr(config, "tie_word_embeddings", False)}
    if set(missing) - tied or unexpected:
        raise ValueError(f"{path}: weights do not match the plan's shapes (missing {sorted(set(missing) - tied)[:5]}, "
                         f"unexpected {sorted(unexpected)[:5]})")
    if tied:
        model.tie_weights()
    return model.eval()


def _at_pruned_sizes(config, plan: Plan) -> bool:
    """Whether an exported config already carries the plan's pruned sizes."""
    if not plan.is_uniform():
        return False
    mlp_ok = not plan.mlp or getattr(config, "intermediate_size", None) == len(plan.mlp[0].keep)
    heads_ok = not plan.heads or getattr(config, "num_attention_heads", None) == len(plan.heads[0].keep_heads)
    return mlp_ok and heads_ok
