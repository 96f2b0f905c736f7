"""The architecture table the zoo matrix (test_architectures.py) and docs/architectures.md
(scripts/architectures.py) run: tiny random models built from transformers' own config classes.
Adding an architecture is one line of ARCHITECTURES.

``Matrix`` is the backend the matrix compiles with: Dynamo captures each graph of a model once, and
every call runs that graph under the options of the moment, through the same analysis, passes and
eager lowering as ``backend="sparse"``; so the product architectures x methods costs one capture
per graph, not one per method.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch
import transformers

from compile_sparse.backend import lower, transform_graph
from compile_sparse.options import parse_options

# the common tiny shape: 2 layers, 4 query heads in 2 KV groups of head_dim 16, MLP width 128
LM = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
          num_key_value_heads=2, max_position_embeddings=128)
ENCODER = dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
               max_position_embeddings=130)
SEQ2SEQ = dict(vocab_size=128, d_model=64, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
               decoder_attention_heads=4, encoder_ffn_dim=128, decoder_ffn_dim=128)


@dataclass(frozen=True)
class Arch:
    """``config``, ``model``: transformers class names; ``kwargs``: the config's arguments;
    ``kind``: "decoder" (causal LM), "encoder" (hidden states out) or "seq2seq" (encoder-decoder
    LM); ``input``: "ids", "pixels" (3 x 32 x 32) or "audio" (16 mel bins x 64 frames);
    ``attn``: the attention implementation; ``limits``: what the project leaves as it is on this
    architecture, feature ("heads", "mlp", "tokens") -> words the reason contains (the matrix
    asserts the reason, so a limit lifted or moved fails the test)."""

    config: str
    kwargs: dict
    model: str
    kind: str = "decoder"
    input: str = "ids"
    attn: str = "sdpa"
    limits: dict = field(default_factory=dict)


FUSED_QKV = {"heads": "fused projection"}
HEAD_BIAS = {"heads": "bias per head"}
QK_NORM = {"heads": "across all heads"}
MOE = {"mlp": "experts"}
ARCHITECTURES = {
    "llama": Arch("LlamaConfig", LM, "LlamaForCausalLM"),
    "mistral": Arch("MistralConfig", dict(LM, sliding_window=8), "MistralForCausalLM"),
    "mixtral": Arch("MixtralConfig", dict(LM, num_local_experts=4, num_experts_per_tok=2), "MixtralForCausalLM", limits=MOE),
    "qwen2": Arch("Qwen2Config", LM, "Qwen2ForCausalLM"),
    "qwen2_sliding": Arch("Qwen2Config", dict(LM, use_sliding_window=True, sliding_window=8, max_window_layers=1),
                          "Qwen2ForCausalLM"),
    "qwen2_moe": Arch("Qwen2MoeConfig", dict(LM, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                             shared_expert_intermediate_size=128), "Qwen2MoeForCausalLM", limits=MOE),
    "olmoe": Arch("OlmoeConfig", dict(LM, num_experts=4, num_experts_per_tok=2), "OlmoeForCausalLM",
                  limits={**MOE, **QK_NORM}),
    "qwen3": Arch("Qwen3Config", dict(LM, head_dim=16), "Qwen3ForCausalLM"),
    "phi3": Arch("Phi3Config", dict(LM, pad_token_id=0, eos_token_id=1, bos_token_id=1), "Phi3ForCausalLM",
                 limits=FUSED_QKV),
    "phi": Arch("PhiConfig", dict(LM, partial_rotary_factor=0.5), "PhiForCausalLM"),
    "gemma": Arch("GemmaConfig", dict(LM, head_dim=16), "GemmaForCausalLM"),
    "gemma2": Arch("Gemma2Config", dict(LM, head_dim=16, sliding_window=8), "Gemma2ForCausalLM", attn="eager"),
    "gemma3": Arch("Gemma3TextConfig", dict(LM, head_dim=16, sliding_window=8,
                                            layer_types=["sliding_attention", "full_attention"]), "Gemma3ForCausalLM"),
    "gpt2": Arch("GPT2Config", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=128), "GPT2LMHeadModel",
                 limits=FUSED_QKV),
    "gpt_neox": Arch("GPTNeoXConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                           intermediate_size=128, max_position_embeddings=128), "GPTNeoXForCausalLM",
                     limits=FUSED_QKV),
    "gptj": Arch("GPTJConfig", dict(vocab_size=128, n_embd=64, n_layer=2, n_head=4, rotary_dim=8, n_positions=128),
                 "GPTJForCausalLM", attn="eager"),
    "opt": Arch("OPTConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, ffn_dim=128, num_attention_heads=4,
                                  max_position_embeddings=128, word_embed_proj_dim=64), "OPTForCausalLM"),
    "falcon": Arch("FalconConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                        new_decoder_architecture=True, num_kv_heads=2), "FalconForCausalLM",
                   limits=FUSED_QKV),
    "falcon_multi_query": Arch("FalconConfig", dict(vocab_size=128, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                    new_decoder_architecture=False, multi_query=True, parallel_attn=True,
                                                    bias=False), "FalconForCausalLM", limits=FUSED_QKV),
    "olmo2": Arch("Olmo2Config", LM, "Olmo2ForCausalLM", limits=QK_NORM),
    "granite": Arch("GraniteConfig", LM, "GraniteForCausalLM"),
    "stablelm": Arch("StableLmConfig", dict(LM, partial_rotary_factor=0.25), "StableLmForCausalLM"),
    "cohere": Arch("CohereConfig", LM, "CohereForCausalLM"),
    "bert": Arch("BertConfig", ENCODER, "BertModel", kind="encoder"),
    "roberta": Arch("RobertaConfig", dict(ENCODER, pad_token_id=1), "RobertaModel", kind="encoder",
                    limits={"tokens": "does not follow"}),
    "distilbert": Arch("DistilBertConfig", dict(vocab_size=128, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
                                                max_position_embeddings=128), "DistilBertModel", kind="encoder"),
    "vit": Arch("ViTConfig", dict(image_size=32, patch_size=8, num_channels=3, hidden_size=64, num_hidden_layers=2,
                                  num_attention_heads=4, intermediate_size=128), "ViTModel", kind="encoder", input="pixels"),
    "bart": Arch("BartConfig", dict(SEQ2SEQ, max_position_embeddings=128), "BartForConditionalGeneration", kind="seq2seq"),
    "t5": Arch("T5Config", dict(vocab_size=128, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_decoder_layers=2,
                                num_heads=4, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1),
               "T5ForConditionalGeneration", kind="seq2seq", limits={**HEAD_BIAS, "tokens": "does not follow"}),
    "whisper": Arch("WhisperConfig", dict(SEQ2SEQ, num_mel_bins=16, max_source_positions=32, max_target_positions=64,
                                          decoder_start_token_id=1, pad_token_id=0, eos_token_id=2, bos_token_id=1),
                    "WhisperForConditionalGeneration", kind="seq2seq", input="audio"),
}


def by_kind(*kinds: str) -> list[str]:
    return [name for name, arch in ARCHITECTURES.items() if arch.kind in kinds]


def build(name: str) -> torch.nn.Module:
    """The architecture's tiny model, random weights seeded by its name, in eval mode."""
    arch = ARCHITECTURES[name]
    config = getattr(transformers, arch.config)(**arch.kwargs)
    config._attn_implementation = arch.attn
    torch.manual_seed(sum(map(ord, name)))
    return getattr(transformers, arch.model)(config).eval()


def expected(config) -> dict:
    """What the analysis should count, read from the config: layers, query / KV heads, head dim and
    MLP width (the names differ between families; transformers maps most of them)."""
    def first(*names, default=None):
        for name in names:
            value = getattr(config, name, None)
            if value is not None:
                return value
        return default

    layers = first("num_hidden_layers", "n_layers", "num_layers")
    heads = first("num_attention_heads", "n_heads", "num_heads", "encoder_attention_heads")
    hidden = first("hidden_size", "dim", "d_model")
    kv_heads = 1 if getattr(config, "multi_query", False) and not getattr(config, "new_decoder_architecture", True) \
        else first("num_key_value_heads", "num_kv_heads", default=heads)
    return {"layers": layers, "heads": heads, "kv_heads": kv_heads,
            "head_dim": first("head_dim", "d_kv", default=hidden // heads),
            "mlp_width": first("intermediate_size", "ffn_dim", "n_inner", "hidden_dim", "d_ff", "encoder_ffn_dim",
                               default=4 * hidden)}


def forward_inputs(name: str, length: int = 24) -> dict:
    """The keyword arguments of one forward without a cache: a seq2seq model also gets 8 decoder
    tokens."""
    kind = ARCHITECTURES[name].kind
    extra = {"use_cache": False} if kind != "encoder" else {}
    if kind == "seq2seq":
        extra["decoder_input_ids"] = torch.arange(3, 11).unsqueeze(0)
    return {**inputs(name, length), **extra}


def inputs(name: str, length: int = 24, batch: int = 1) -> dict:
    """Example inputs for the architecture's kind, drawn from a generator seeded by the name."""
    gen = torch.Generator().manual_seed(len(name) * 7 + length)
    kind = ARCHITECTURES[name].input
    if kind == "pixels":
        return {"pixel_values": torch.randn(batch, 3, 32, 32, generator=gen)}
    if kind == "audio":
        return {"input_features": torch.randn(batch, 16, 64, generator=gen)}
    return {"input_ids": torch.randint(3, 128, (batch, length), generator=gen)}


class Matrix:
    """A torch.compile backend: each graph Dynamo captures is transformed under ``options`` (set it
    between calls) the first time it runs under them, then lowered eagerly, as ``backend="sparse"``
    with ``"lowering": "eager"`` would. ``reports`` holds (options, GraphReport) for every graph
    transformed, ``graphs`` (options, rewritten graph, example inputs)."""

    def __init__(self):
        self.options: dict = {}
        self.reports: list[tuple[dict, object]] = []
        self.graphs: list[tuple[dict, torch.fx.GraphModule, list]] = []  # (options, rewritten graph, inputs)

    def __call__(self, gm, example_inputs):
        variants = {}

        def run(*args):
            key = json.dumps(self.options, sort_keys=True)
            if key not in variants:
                rewritten, report = transform_graph(gm, example_inputs, parse_options(self.options))
                self.reports.append((self.options, report))
                self.graphs.append((self.options, rewritten, list(example_inputs)))
                variants[key] = lower(rewritten, example_inputs, "eager")
            return variants[key](*args)

        return run

    def reports_for(self, options: dict) -> list:
        return [report for opts, report in self.reports if opts == options]
