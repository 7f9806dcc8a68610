"""KV-cache generation: equal to full recompute, reproducible sampling, EOS handling,
log-probs equal to a full forward."""
import pytest
import torch
import torch.nn.functional as F

from trellis.model import GPT, GenerationConfig, ModelConfig, generate
from trellis.model.generate import filter_logits

V = 61


@pytest.fixture(scope="module")
def gpt() -> GPT:
    torch.manual_seed(0)
    m = GPT(ModelConfig(arch="gpt", vocab_size=V, n_layer=2, n_head=4, d_model=32,
                        max_seq_len=64, dropout=0.1))
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # larger weights than the 0.02 init: varied, confident outputs
        for p in m.parameters():
            if p.dim() > 1:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def _prompts(lengths=(7, 4, 1), P=7):
    g = torch.Generator().manual_seed(1)
    ids = torch.zeros(len(lengths), P, dtype=torch.long)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, P - n:] = torch.randint(4, V, (n,), generator=g)
        mask[i, P - n:] = 1
    return ids, mask


def _greedy_recompute(model, ids, mask, n):
    """Reference: full forward over the whole sequence at every step, no cache."""
    out = []
    for _ in range(n):
        with torch.no_grad():
            tok = model(ids, attention_mask=mask)[:, -1].argmax(-1)
        out.append(tok)
        ids = torch.cat([ids, tok[:, None]], 1)
        mask = torch.cat([mask, torch.ones_like(tok)[:, None]], 1)
    return torch.stack(out, 1)


def _recompute_logprobs(model, ids, mask, gen, temperature):
    full = torch.cat([ids, gen.tokens], 1)
    full_mask = torch.cat([mask, gen.mask], 1)
    with torch.no_grad():
        logits = model(full, attention_mask=full_mask)[:, ids.shape[1] - 1:-1]
    logp = F.log_softmax(logits.float() / temperature, -1)
    return logp.gather(-1, gen.tokens[..., None]).squeeze(-1) * gen.mask


def test_kv_cache_greedy_equals_full_recompute(gpt):
    ids, mask = _prompts()
    gpt.train()
    gen = generate(gpt, ids, mask, GenerationConfig(max_new_tokens=20, eos_id=V))
    assert gpt.training  # mode restored
    assert gen.tokens.shape == (3, 20) and gen.mask.all()
    gpt.eval()
    ref = _greedy_recompute(gpt, ids, mask, 20)
    assert torch.equal(gen.tokens, ref)
    assert len(set(gen.tokens[0].tolist())) > 1  # not a degenerate constant output


def test_left_padding_does_not_change_the_continuation(gpt):
    ids, mask = _prompts()
    cfg = GenerationConfig(max_new_tokens=12, eos_id=V)
    batched = generate(gpt, ids, mask, cfg)
    alone = generate(gpt, ids[1:2, -4:], mask[1:2, -4:], cfg)
    assert torch.equal(batched.tokens[1], alone.tokens[0])
    assert torch.allclose(batched.logprobs[1], alone.logprobs[0], atol=1e-5)


def test_sampling_is_reproducible_and_logprobs_match_recompute(gpt):
    ids, mask = _prompts()
    cfg = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=0.7, top_k=20,
                           top_p=0.95, eos_id=V)
    a = generate(gpt, ids, mask, cfg, torch.Generator().manual_seed(7))
    b = generate(gpt, ids, mask, cfg, torch.Generator().manual_seed(7))
    c = generate(gpt, ids, mask, cfg, torch.Generator().manual_seed(8))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.logprobs, b.logprobs)
    assert not torch.equal(a.tokens, c.tokens)
    ref = _recompute_logprobs(gpt, ids, mask, a, 0.7)
    assert (a.logprobs - ref).abs().max().item() <= 1e-5
    assert (a.logprobs < 0).all()


def test_top_k_1_and_tiny_top_p_sample_the_argmax(gpt):
    ids, mask = _prompts()
    greedy = generate(gpt, ids, mask, GenerationConfig(max_new_tokens=8, eos_id=V))
    for kw in ({"top_k": 1}, {"top_p": 1e-6}, {"top_p": 0.0}):
        cfg = GenerationConfig(max_new_tokens=8, do_sample=True, eos_id=V, **kw)
        s = generate(gpt, ids, mask, cfg, torch.Generator().manual_seed(0))
        assert torch.equal(s.tokens, greedy.tokens), kw


def test_filter_logits_keeps_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, 0, 0.8))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits, 3, 1.0))
    assert kept.tolist() == [[True, True, True, False]]


def test_eos_stops_each_row_and_pads_after(gpt):
    ids, mask = _prompts()
    free = generate(gpt, ids, mask, GenerationConfig(max_new_tokens=20, eos_id=V))
    eos = int(free.tokens[0, 3])
    gen = generate(gpt, ids, mask, GenerationConfig(max_new_tokens=20, eos_id=eos, pad_id=0))
    for r in range(3):
        hits = (free.tokens[r] == eos).nonzero()
        stop = int(hits[0]) + 1 if len(hits) else gen.tokens.shape[1]
        assert gen.mask[r, :stop].all() and not gen.mask[r, stop:].any()
        assert torch.equal(gen.tokens[r, :stop], free.tokens[r, :stop])
        assert (gen.tokens[r, stop:] == 0).all() and (gen.logprobs[r, stop:] == 0).all()
    ref = _recompute_logprobs(gpt, ids, mask, gen, 1.0)
    assert (gen.logprobs - ref).abs().max().item() <= 1e-5


def test_stops_early_when_all_rows_finished(gpt):
    ids, mask = _prompts((5,), 5)
    free = generate(gpt, ids, mask, GenerationConfig(max_new_tokens=20, eos_id=V))
    eos = int(free.tokens[0, 2])
    first = int((free.tokens[0] == eos).nonzero()[0]) + 1
    gen = generate(gpt, ids, mask, GenerationConfig(max_new_tokens=20, eos_id=eos))
    assert gen.tokens.shape == (1, first) and gen.mask.all()
    full = generate(gpt, ids, mask, GenerationConfig(max_new_tokens=20, eos_id=eos,
                                                     stop_early=False))
    assert full.tokens.shape == (1, 20) and int(full.mask.sum()) == first


def test_bad_prompts_are_refused(gpt):
    ids, mask = _prompts()
    with pytest.raises(ValueError, match="left-padded"):
        generate(gpt, ids.flip(1), mask.flip(1), GenerationConfig())
    with pytest.raises(ValueError, match="max_seq_len"):
        generate(gpt, ids, mask, GenerationConfig(max_new_tokens=60))
