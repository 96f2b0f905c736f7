"""Generate with SmolLM2 whose KV cache is evicted as it is filled: backend="sparse" with no
compression method chosen (the default recipe: TOVA per KV head, pooled, keeping 50% of the prompt's cache), against the
dense model. Prints the cache per layer, the text both generate, and the memory the cache takes.
Under a minute on 2 CPU cores with the default ``{"lowering": "eager"}`` (the rewritten graph runs
without Inductor's compile time; ``--options '{}'`` compiles with Inductor: about 2 more minutes).

    .venv/bin/python examples/generate_kv_eviction.py [--options JSON] [--tokens 40]
"""

import argparse
import json
import time

import torch

import compile_sparse
from compile_sparse import models
from compile_sparse.timing import cache_bytes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--options", default='{"lowering": "eager"}',
                        help="backend options as JSON (no method or recipe: the default recipe)")
    parser.add_argument("--prompt-tokens", type=int, default=1024)
    parser.add_argument("--tokens", type=int, default=40, help="tokens to generate")
    args = parser.parse_args()
    options = json.loads(args.options)
    model, tokenizer = models.load("smollm2")
    speech, text = models.sotu_documents("test")[-1]
    prompt = tokenizer(text, return_tensors="pt").input_ids[:, :args.prompt_tokens]  # (1, T)
    parsed = compile_sparse.parse_options(options).to_dict()
    print(f"prompt: the first {prompt.shape[1]} tokens of {speech}; options {json.dumps(options)}: recipe "
          f"{parsed['recipe']}, kv {parsed.get('kv')}")

    for name in ("dense", "sparse"):
        forward = model.forward
        if name == "sparse":  # `import compile_sparse` is not needed for backend="sparse": an entry point registers it
            model.forward = torch.compile(forward, backend="sparse", options=options or None)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(prompt, max_new_tokens=args.tokens, do_sample=False, return_dict_in_generate=True,
                                 pad_token_id=tokenizer.eos_token_id)
        seconds = time.perf_counter() - start
        model.forward = forward
        cache = out.past_key_values
        lengths = sorted({layer.keys.shape[2] for layer in cache.layers})
        print(f"\n{name}: {seconds:.0f} s ({'compile included' if name == 'sparse' else 'eager'}); cache per layer "
              f"{lengths} tokens, {cache_bytes(cache) / 1e6:.1f} MB")
        print("  " + repr(tokenizer.decode(out.sequences[0, prompt.shape[1]:]))[:400])


if __name__ == "__main__":
    main()
