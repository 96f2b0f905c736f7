"""Shared test helpers."""

import torch


def generate(model, input_ids, steps=8, **kwargs):
    """Greedy generate ``steps`` tokens; returns (sequences, logits stacked over steps)."""
    with torch.no_grad():
        out = model.generate(input_ids, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
                             output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kwargs)
    return out.sequences, torch.stack(out.logits)


def compiled_generate_matches(model, input_ids, options=None, steps=8, atol=1e-5, **kwargs):
    """Generate eagerly, then with forward compiled by the sparse backend; assert both agree."""
    ref_seq, ref_logits = generate(model, input_ids, steps, **kwargs)
    eager_forward = model.forward
    model.forward = torch.compile(eager_forward, backend="sparse", options=options)
    try:
        seq, logits = generate(model, input_ids, steps, **kwargs)
    finally:
        model.forward = eager_forward
    assert torch.equal(seq, ref_seq)
    torch.testing.assert_close(logits, ref_logits, atol=atol, rtol=1.3e-6)
