"""The encoder-decoder Transformer: Marian parity both ways, KV-cache decoding against full
recompute, beam search at width 1 against greedy, padding invariance."""
from __future__ import annotations

import pytest
import torch

from trellis.model.build import build_model
from trellis.model.config import ModelConfig
from trellis.model.seq2seq import Seq2Seq, Seq2SeqCache, sinusoid_table
from trellis.model.seq2seq_generate import TranslateConfig, beam_search, greedy_search

transformers = pytest.importorskip("transformers")
from transformers import MarianConfig, MarianMTModel  # noqa: E402

from trellis.model.hf_seq2seq import (load_marian_pretrained, marian_config,  # noqa: E402
                                      save_marian_pretrained)

TOL = 1e-5


def cfg(**kw) -> ModelConfig:
    base = dict(arch="seq2seq", vocab_size=97, n_layer=2, n_decoder_layer=3, n_head=4,
                d_model=32, d_ff=48, max_seq_len=40, dropout=0.0)
    return ModelConfig(**{**base, **kw})


def batch(seed: int = 0, vocab: int = 97) -> dict[str, torch.Tensor]:
    """Right-padded sources of different lengths, BOS-started target inputs."""
    g = torch.Generator().manual_seed(seed)
    src = torch.randint(8, vocab, (3, 9), generator=g)
    mask = torch.ones_like(src)
    mask[1, 6:] = 0
    mask[2, 3:] = 0
    src = src.masked_fill(mask == 0, 0)
    tgt = torch.randint(8, vocab, (3, 7), generator=g)
    tgt[:, 0] = 2
    return {"input_ids": src, "attention_mask": mask, "decoder_input_ids": tgt}


def hf_logits(model: MarianMTModel, b: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**b).logits


def real(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max().detach())


@pytest.mark.parametrize("share", [True, False])
def test_marian_to_trellis_parity(tmp_path, share):
    c = cfg(share_embeddings=share)
    torch.manual_seed(0)
    hf = MarianMTModel(MarianConfig(**marian_config(c))).eval()
    with torch.no_grad():  # a non-zero output bias must travel too
        hf.final_logits_bias.normal_()
    hf.save_pretrained(tmp_path)
    ours, loaded = load_marian_pretrained(tmp_path)
    assert loaded == c
    b = batch()
    diff = real(ours(**b), hf_logits(hf, b))
    print(f"marian -> trellis (share={share}): max |logit diff| {diff:.2e}")
    assert diff <= TOL


@pytest.mark.parametrize("share", [True, False])
def test_trellis_to_marian_parity(tmp_path, share):
    c = cfg(share_embeddings=share)
    torch.manual_seed(1)
    ours = Seq2Seq(c).eval()
    save_marian_pretrained(ours, c, tmp_path)
    hf, info = MarianMTModel.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    b = batch(1)
    with torch.no_grad():
        diff = real(ours(**b), hf_logits(hf.eval(), b))
    print(f"trellis -> marian (share={share}): max |logit diff| {diff:.2e}")
    assert diff <= TOL


def spread(model: Seq2Seq) -> Seq2Seq:
    """Wider random weights, so a random model's greedy output varies (and hits EOS)."""
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    return model


@pytest.mark.parametrize("beams", [1, 3])
def test_decoding_matches_transformers_generate(tmp_path, beams):
    c = cfg(vocab_size=12)
    torch.manual_seed(3)  # a seed whose random outputs differ by row and include an EOS
    ours = spread(Seq2Seq(c)).eval()
    save_marian_pretrained(ours, c, tmp_path)
    hf = MarianMTModel.from_pretrained(tmp_path).eval()
    b = batch(2, vocab=12)
    tc = TranslateConfig(max_new_tokens=12, beam_size=beams, length_penalty=1.0)
    got = (greedy_search if beams == 1 else beam_search)(ours, b["input_ids"],
                                                        b["attention_mask"], tc)
    out = hf.generate(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                      num_beams=beams, do_sample=False, max_new_tokens=12, min_new_tokens=0,
                      forced_eos_token_id=None, length_penalty=1.0,
                      **({"early_stopping": True} if beams > 1 else {}))
    want = [row[1:] for row in out.tolist()]  # drop the start token
    want = [row[:row.index(3)] if 3 in row else row for row in want]
    assert got == want
    assert len({tuple(r) for r in got}) > 1 and any(len(r) < 12 for r in got), got


def test_pre_ln_refused_by_marian_export(tmp_path):
    c = cfg(norm_position="pre")
    with pytest.raises(ValueError, match="post-LN"):
        save_marian_pretrained(Seq2Seq(c), c, tmp_path)


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_kv_cache_decoding_equals_full_recompute(norm):
    torch.manual_seed(3)
    model = build_model(cfg(norm_position=norm), "seq2seq").eval()
    b = batch(3)
    with torch.no_grad():
        full = model(**b)  # (B, T, V)
        memory = model.encode(b["input_ids"], b["attention_mask"])
        cache = Seq2SeqCache(b["decoder_input_ids"].shape[1])
        first = model.decode(b["decoder_input_ids"][:, :3], memory, b["attention_mask"], cache)
        steps = [first] + [model.decode(b["decoder_input_ids"][:, t:t + 1], memory,
                                        b["attention_mask"], cache)
                           for t in range(3, b["decoder_input_ids"].shape[1])]
    diff = real(torch.cat(steps, dim=1), full)
    print(f"kv cache ({norm}-LN) vs recompute: max |logit diff| {diff:.2e}")
    assert diff <= TOL


def test_source_padding_does_not_change_logits():
    torch.manual_seed(4)
    model = Seq2Seq(cfg()).eval()
    b = batch(4)
    row = {k: v[2:3] for k, v in b.items()}
    short = {"input_ids": row["input_ids"][:, :3], "attention_mask": row["attention_mask"][:, :3],
             "decoder_input_ids": row["decoder_input_ids"]}
    with torch.no_grad():
        assert real(model(**row), model(**short)) <= TOL


@pytest.mark.parametrize("norm", ["post", "pre"])
def test_beam_one_equals_greedy(norm):
    tc = TranslateConfig(max_new_tokens=15, beam_size=1, eos_id=3)
    lengths = []
    for seed in range(6):
        torch.manual_seed(seed)
        model = spread(Seq2Seq(cfg(norm_position=norm, vocab_size=12))).eval()
        b = batch(seed, vocab=12)
        greedy = greedy_search(model, b["input_ids"], b["attention_mask"], tc)
        assert beam_search(model, b["input_ids"], b["attention_mask"], tc) == greedy
        lengths += [len(g) for g in greedy]
    assert min(lengths) < 15 and max(lengths) == 15, lengths  # EOS-ended and cut rows


def test_beam_search_finds_no_worse_sequences():
    """A wider beam's best hypothesis scores at least the greedy one (length_penalty 0)."""
    torch.manual_seed(6)
    model = Seq2Seq(cfg(vocab_size=12)).eval()
    b = batch(6, vocab=12)
    tc = TranslateConfig(max_new_tokens=8, length_penalty=0.0)
    wide = TranslateConfig(max_new_tokens=8, length_penalty=0.0, beam_size=4)

    def logprob(row: int, toks: list[int]) -> float:
        full = toks + ([3] if len(toks) < 8 else [])
        dec = torch.tensor([[2] + full[:-1]])
        with torch.no_grad():
            lp = model(b["input_ids"][row:row + 1], b["attention_mask"][row:row + 1],
                       dec).log_softmax(-1)[0]
        return float(lp.gather(1, torch.tensor(full)[:, None]).sum())

    g = greedy_search(model, b["input_ids"], b["attention_mask"], tc)
    w = beam_search(model, b["input_ids"], b["attention_mask"], wide)
    for row in range(3):
        assert logprob(row, w[row]) >= logprob(row, g[row]) - 1e-4


def test_sinusoids_match_marian():
    from transformers.models.marian.modeling_marian import MarianSinusoidalPositionalEmbedding
    emb = MarianSinusoidalPositionalEmbedding(50, 33)
    assert real(sinusoid_table(50, 33), emb.create_weight()) <= 1e-6


def test_shared_and_separate_embeddings_are_tied_as_documented():
    shared, separate = Seq2Seq(cfg()), Seq2Seq(cfg(share_embeddings=False))
    assert shared.encoder.embed_tokens.weight is shared.decoder.embed_tokens.weight
    assert shared.lm_head.weight is shared.decoder.embed_tokens.weight
    assert separate.encoder.embed_tokens.weight is not separate.decoder.embed_tokens.weight
    assert separate.lm_head.weight is separate.decoder.embed_tokens.weight
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731  unique parameters
    assert n(separate) - n(shared) == 97 * 32


def test_activation_checkpointing_gives_the_same_gradients():
    from trellis.model.build import set_activation_checkpointing

    grads = []
    for ckpt in (False, True):
        torch.manual_seed(7)
        model = Seq2Seq(cfg(norm_position="pre")).train()
        set_activation_checkpointing(model, ckpt)
        b = batch(7)
        model(**b).logsumexp(-1).mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert real(grads[0], grads[1]) <= 1e-6
