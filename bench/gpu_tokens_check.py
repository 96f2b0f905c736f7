"""GPU check: token dropping and merging on CUDA through Inductor (Triton kernels) against the same
rewritten graph run eagerly (lowering "eager"): cache lengths, output shapes, max differences.

    PYTHONPATH=. python bench/gpu_tokens_check.py --json docs/data/gpu_tokens_check.json    # on a CUDA machine
"""

import argparse
import functools
import json
import shlex
import sys

import torch

from compile_sparse import models
from compile_sparse.backend import sparse_backend


def run(model, kwargs: dict, tokens: dict, lowering: str):
    torch.compiler.reset()
    options = {"tokens": tokens, "lowering": lowering}
    with torch.no_grad():
        return torch.compile(model, backend=functools.partial(sparse_backend, options=options))(**kwargs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", default=None, help="write the rows as JSON")
    args = parser.parse_args()
    rows = []
    torch.manual_seed(0)
    llama = models.tiny_llama(layers=4).cuda()
    ids = torch.randint(0, 128, (1, 256), device="cuda")
    kwargs = dict(input_ids=ids, use_cache=True, logits_to_keep=1)
    tokens = {"method": "lazyllm", "layers": [1, 3], "keep_ratios": [0.6, 0.3]}
    eager, inductor = run(llama, kwargs, tokens, "eager"), run(llama, kwargs, tokens, "inductor")
    rows.append({"method": "lazyllm", "tokens": tokens, "prompt": 256,
                 "cache_tokens": [layer.keys.shape[2] for layer in inductor.past_key_values.layers],
                 "max_logit_difference": (eager.logits - inductor.logits).abs().max().item()})
    print(rows[-1])
    bert = models.tiny_bert(layers=4).cuda()
    ids = torch.randint(0, 128, (1, 100), device="cuda")
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids))
    for tokens in ({"method": "tome", "layers": [1, 2, 3], "keep_ratios": [0.8, 0.6, 0.5]},
                   {"method": "evit", "layers": [2], "keep_ratios": [0.5]}):
        eager, inductor = run(bert, kwargs, tokens, "eager"), run(bert, kwargs, tokens, "inductor")
        rows.append({"method": tokens["method"], "tokens": tokens, "prompt": 100,
                     "output_shape": list(inductor.last_hidden_state.shape),
                     "max_hidden_difference": (eager.last_hidden_state - inductor.last_hidden_state).abs().max().item(),
                     "max_pooler_difference": (eager.pooler_output - inductor.pooler_output).abs().max().item()})
        print(rows[-1])
    out = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "command": shlex.join(sys.argv),
           "rows": rows}
    print(out["device"], out["torch"])
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
