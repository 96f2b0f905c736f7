"""GPU check: KV eviction on the CUDA serving path. ``generate(..., cache_implementation="static")``
with ``model.forward`` compiled by the backend, with and without ``mode="reduce-overhead"`` (CUDA
graphs); a StaticCache decode loop that checks the buffers keep their storage; decode-step times.

    PYTHONPATH=. python bench/gpu_serving_check.py --json docs/data/gpu_serving_check.json    # on a CUDA machine

Correctness (tiny Llama, fp32), reported per row: whether a run under CUDA graphs generates what
the same options generate without them, whether ratio 0 generates what the uncompiled model does,
the cache's slots and each row's kept tokens, the graphs compiled, and how many graphs Inductor
left without CUDA graphs (its ``cudagraph_skips`` counter; the reason goes to the log). Speed (SmolLM2's
shapes, random weights, bf16, 4 layers): one decode step after a 4096-token prompt, dense against
the KV method at 0.75 (1024 kept) and the "ideal" (dense after a 1024-token prompt), each timed
(synchronized) as the median of repeated steps, the sides interleaved.
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
import traceback

import torch
import transformers as tf
from torch._dynamo.utils import counters

from compile_sparse import models
from compile_sparse.backend import sparse_backend
from compile_sparse.state import STATE

H2O = {"kv": {"method": "h2o", "compression_ratio": 0.75}}
DEVICE = "cuda"  # --device cpu: a dry run of the script itself
EARLY_INIT = False  # --early-init: StaticCache buffers allocated before the compiled prefill


def static_cache(model, length, batch=1):
    """A StaticCache; with EARLY_INIT its buffers exist (and are static addresses) before any call."""
    cache = tf.StaticCache(config=model.config, max_cache_len=length)
    if EARLY_INIT:
        config = model.config
        cache.early_initialization(batch, config.num_key_value_heads, config.head_dim, model.dtype, torch.device(DEVICE))
    return cache
CASES = {"default": None, "h2o-0.75": H2O, "h2o-0": {"kv": {"method": "h2o", "compression_ratio": 0.0}}}


def compile_forward(model, options, mode):
    """``model.forward`` compiled by the backend (or by Inductor when ``options`` is "dense"); every
    graph the backend compiles is counted in ``counters["compile_sparse"]["graphs"]``."""
    forward = type(model).forward.__get__(model)
    if options == "dense":
        model.forward = torch.compile(forward, mode=mode)
        return model

    def backend(gm, example_inputs):
        counters["compile_sparse"]["graphs"] += 1
        return sparse_backend(gm, example_inputs, options=options, mode=mode)

    model.forward = torch.compile(forward, backend=backend)
    return model


def generate(model, ids, mask, hf_compile, steps=32):
    """``hf_compile`` False: generate() does not compile its decode call itself (disable_compile)."""
    with torch.no_grad():
        return model.generate(ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                              pad_token_id=0, cache_implementation="static", return_dict_in_generate=True,
                              disable_compile=not hf_compile)


def generate_rows(rows, cases, modes, hf_compile):
    """generate() with StaticCache on a left-padded batch of two, per case and mode."""
    torch.manual_seed(0)
    ids = torch.randint(3, 100, (2, 96), device=DEVICE)
    mask = torch.ones_like(ids)
    mask[1, :20] = 0  # the second prompt is 76 tokens, left-padded
    dense = generate(models.tiny_llama().to(DEVICE), ids, mask, hf_compile=False).sequences
    for name in cases:
        sequences = {}
        for mode in modes:
            torch.compiler.reset()
            counters.clear()
            row = {"check": "generate", "case": name, "mode": mode or "default", "hf_compile": hf_compile}
            try:
                out = generate(compile_forward(models.tiny_llama().to(DEVICE), CASES[name], mode), ids, mask, hf_compile)
                sequences[mode] = out.sequences
                keys = out.past_key_values.layers[0].keys
                state = STATE.store.get(keys)
                row.update(cache_tokens=[layer.keys.shape[-2] for layer in out.past_key_values.layers],
                           kept_per_row=None if state is None else (state[..., 0] >= 0).sum(-1)[:, 0].tolist(),
                           cudagraph_skips=counters["inductor"]["cudagraph_skips"],
                           unique_graphs=counters["stats"]["unique_graphs"],
                           sparse_graphs=counters["compile_sparse"]["graphs"],
                           equals_dense=bool(torch.equal(out.sequences, dense)))
                if mode is not None and None in sequences:
                    row["equals_default_mode"] = bool(torch.equal(sequences[None], out.sequences))
            except Exception as err:  # noqa: BLE001 - a check script reports every failure and goes on
                row["error"] = f"{type(err).__name__}: {err}"[:2000]
                traceback.print_exc()
            rows.append(row)
            print(row, flush=True)


def decode_loop_row(rows, options, mode, steps=32):
    """Prefill into a StaticCache, then ``steps`` decode steps: graphs compiled, storage kept."""
    torch.compiler.reset()
    counters.clear()
    row = {"check": "decode loop", "options": options, "mode": mode or "default"}
    try:
        model = compile_forward(models.tiny_llama().to(DEVICE), options, mode)
        ids = torch.randint(3, 100, (1, 64), device=DEVICE, generator=torch.Generator(DEVICE).manual_seed(1))
        cache = static_cache(model, 128)
        with torch.no_grad():
            model(input_ids=ids, past_key_values=cache, use_cache=True)
            pointers = [layer.keys.data_ptr() for layer in cache.layers]
            graphs = counters["stats"]["unique_graphs"]
            for step in range(steps):
                position = torch.tensor([64 + step], device=DEVICE)
                model(input_ids=torch.tensor([[5]], device=DEVICE), past_key_values=cache,
                      position_ids=position[None], cache_position=position, use_cache=True)
        row.update(cache_tokens=[layer.keys.shape[-2] for layer in cache.layers],
                   storage_kept=[layer.keys.data_ptr() for layer in cache.layers] == pointers,
                   decode_graphs=counters["stats"]["unique_graphs"] - graphs,
                   cudagraph_skips=counters["inductor"]["cudagraph_skips"])
    except Exception as err:  # noqa: BLE001
        row["error"] = f"{type(err).__name__}: {err}"[:2000]
        traceback.print_exc()
    rows.append(row)
    print(row, flush=True)


def smollm2_shaped(layers: int) -> torch.nn.Module:
    """SmolLM2-135M's shapes (its config), random weights."""
    config = tf.LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                            num_attention_heads=9, num_key_value_heads=3, head_dim=64, max_position_embeddings=8192,
                            rope_theta=100000.0, tie_word_embeddings=True, attn_implementation="sdpa")
    torch.manual_seed(0)
    return tf.LlamaForCausalLM(config).eval().to(DEVICE, torch.bfloat16)


def speed_rows(rows, layers, context, repeats, modes):
    """Decode-step times, dense / ideal / sparse (H2O 0.75 and the default), per mode."""
    for mode in modes:
        torch.compiler.reset()
        sides = {"dense": ("dense", context), "ideal": ("dense", context // 4),
                 "h2o-0.75": (H2O, context), "default": (None, context)}
        steps = {}
        for name, (options, length) in sides.items():
            try:
                model = compile_forward(smollm2_shaped(layers), options, mode)
                ids = torch.randint(3, 1000, (1, length), device=DEVICE)
                cache = static_cache(model, length + repeats + 8)
                with torch.no_grad():
                    model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                position = [length]

                def step(model=model, cache=cache, position=position):
                    at = torch.tensor([position[0]], device=DEVICE)
                    model(input_ids=torch.tensor([[7]], device=DEVICE), past_key_values=cache, position_ids=at[None],
                          cache_position=at, use_cache=True)
                    position[0] += 1

                with torch.no_grad():
                    for _ in range(3):  # compile and warm up (CUDA graphs record on the second call)
                        step()
                steps[name] = (step, cache)
            except Exception as err:  # noqa: BLE001
                rows.append({"check": "speed", "side": name, "mode": mode or "default",
                             "error": f"{type(err).__name__}: {err}"[:2000]})
                traceback.print_exc()
        times = {name: [] for name in steps}
        with torch.no_grad():
            for _ in range(repeats):  # interleaved: one step of each side per round
                for name, (step, _) in steps.items():
                    start = time.perf_counter()
                    step()
                    if DEVICE == "cuda":
                        torch.cuda.synchronize()
                    times[name].append((time.perf_counter() - start) * 1e3)
        for name, samples in times.items():
            quartiles = statistics.quantiles(samples, n=4)
            rows.append({"check": "speed", "side": name, "mode": mode or "default", "layers": layers,
                         "context": sides[name][1], "cache_tokens": steps[name][1].layers[0].keys.shape[-2],
                         "median_ms": statistics.median(samples), "q1_ms": quartiles[0], "q3_ms": quartiles[2]})
            print(rows[-1], flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the rows as JSON")
    parser.add_argument("--layers", type=int, default=4, help="layers of the SmolLM2-shaped model (speed)")
    parser.add_argument("--context", type=int, default=4096, help="prompt tokens before the timed steps")
    parser.add_argument("--repeats", type=int, default=50, help="timed decode steps per side")
    parser.add_argument("--skip", nargs="*", default=[], choices=["generate", "loop", "speed"])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="generate() cases")
    parser.add_argument("--modes", nargs="+", default=["default", "reduce-overhead"], choices=["default", "reduce-overhead"],
                        help="the modes of the generate() and decode-loop checks")
    parser.add_argument("--no-hf-compile", action="store_true", help="generate(disable_compile=True)")
    parser.add_argument("--speed-modes", nargs="+", default=["reduce-overhead"], choices=["reduce-overhead", "default"])
    parser.add_argument("--loop-cases", type=int, default=2, help="decode-loop cases: 1 = H2O only, 2 = and the default")
    parser.add_argument("--early-init", action="store_true", help="allocate StaticCache buffers before the prefill")
    parser.add_argument("--no-graph-partition", action="store_true", help="Inductor's graph_partition off")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    global DEVICE, EARLY_INIT
    DEVICE, EARLY_INIT = args.device, args.early_init
    if args.no_graph_partition:
        torch._inductor.config.graph_partition = False
    torch._dynamo.config.recompile_limit = 64  # every side below is a model of its own: a graph each
    modes = [None if m == "default" else m for m in args.modes]
    rows: list[dict] = []
    out = {"device": torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu", "torch": torch.__version__, "transformers": tf.__version__,
           "command": shlex.join(sys.argv), "rows": rows}
    print(out["device"], out["torch"], out["transformers"], flush=True)

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(out, f, indent=1)

    if "generate" not in args.skip:
        generate_rows(rows, args.cases, modes, not args.no_hf_compile)
        save()
    if "loop" not in args.skip:
        for options in [H2O, None][:args.loop_cases]:
            for mode in modes:
                decode_loop_row(rows, options, mode)
        save()
    if "speed" not in args.skip:
        speed_rows(rows, args.layers, args.context, args.repeats,
                   [None if m == "default" else m for m in args.speed_modes])
        save()


if __name__ == "__main__":
    main()
