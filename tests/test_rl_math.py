"""PPO / RLHF loss math against hand-worked numbers: masked statistics, KL estimators,
shaped rewards, GAE (incl. padded tails), clipped policy and value losses with their zero
gradients, the adaptive KL controller, the pairwise reward-model loss, Experience batches."""
import math

import pyarrow as pa
import pytest
import torch

from trellis.data_pipeline.collate import PairCollator, ranking_pairs
from trellis.data_pipeline.rollout import from_arrow as rollout_from_arrow
from trellis.rl.experience import Experience, make_experience
from trellis.rl.kl import AdaptiveKLController, FixedKLController, make_kl_controller
from trellis.rl.ppo_math import (entropy_from_logits, explained_variance, gae, kl_penalty,
                         masked_mean, masked_var, masked_whiten, policy_loss, shaped_rewards,
                         token_logprobs, value_loss)
from trellis.rl.rm_loss import pairs_from_collator, pairwise_rm_loss

approx = pytest.approx


def close(t: torch.Tensor, want) -> None:
    assert torch.allclose(t, torch.tensor(want, dtype=t.dtype), rtol=1e-5, atol=1e-6), t


# -- masked statistics -----------------------------------------------------------------------
def test_masked_mean_ignores_padding_even_if_inf():
    x = torch.tensor([[1.0, 3.0, float("-inf")], [5.0, float("nan"), 0.0]])
    m = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, m).item() == approx(3.0)
    assert masked_mean(x, m, dim=1).tolist() == approx([2.0, 5.0])
    assert masked_mean(x, torch.zeros_like(m)).item() == 0.0


def test_masked_whiten_mean0_var1_and_unmasked_untouched():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 6, generator=g) * 3 + 7
    m = torch.tensor([[1] * 6, [1] * 4 + [0] * 2, [1] * 2 + [0] * 4, [1] + [0] * 5]).bool()
    w = masked_whiten(x, m)
    assert masked_mean(w, m).item() == approx(0.0, abs=1e-5)
    assert masked_var(w, m).item() == approx(1.0, abs=1e-4)
    sel = w[m]
    assert sel.var(unbiased=True).item() == approx(1.0, abs=1e-4)  # Bessel, as TRL
    assert torch.equal(w[~m], x[~m])
    # shift_mean=False keeps the level: mean stays, spread becomes 1
    w2 = masked_whiten(x, m, shift_mean=False)
    assert masked_mean(w2, m).item() == approx(masked_mean(x, m).item(), abs=1e-4)


def test_masked_var_with_one_entry_is_zero_not_nan():
    assert masked_var(torch.tensor([[2.0, 9.0]]), torch.tensor([[1, 0]])).item() == 0.0


# -- log-probs, entropy, KL ------------------------------------------------------------------
def test_token_logprobs_and_entropy():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]])  # p = [1/4, 3/4], [1/2, 1/2]
    tokens = torch.tensor([[1, 0]])
    assert token_logprobs(logits, tokens).tolist()[0] == approx([math.log(0.75), math.log(0.5)])
    # temperature 2 halves the logits: p = [1/(1+sqrt 3), sqrt 3/(1+sqrt 3)]
    s3 = math.sqrt(3.0)
    assert token_logprobs(logits, tokens, 2.0)[0, 0].item() == approx(math.log(s3 / (1 + s3)))
    ent = entropy_from_logits(logits)[0]
    h = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    assert ent.tolist() == approx([h, math.log(2.0)])
    assert token_logprobs(logits.half(), tokens).dtype == torch.float32


def test_kl_estimators_by_hand():
    logp = torch.tensor([math.log(0.5), math.log(0.2)])
    ref = torch.tensor([math.log(0.25), math.log(0.4)])
    # log r = ref - logp = [-log 2, log 2]
    assert kl_penalty(logp, ref, "k1").tolist() == approx([math.log(2), -math.log(2)])
    assert kl_penalty(logp, ref, "k2").tolist() == approx([0.5 * math.log(2) ** 2] * 2)
    # k3 = (r - 1) - log r with r = 1/2 and 2
    assert kl_penalty(logp, ref, "k3").tolist() == approx([-0.5 + math.log(2), 1 - math.log(2)])
    assert (kl_penalty(logp, ref, "k3") >= 0).all()
    with pytest.raises(ValueError, match="k1, k2, k3"):
        kl_penalty(logp, ref, "k4")


def test_k1_and_k3_are_unbiased_kl_estimates():
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.3, 0.3, 0.4])
    true_kl = float((p * (p / q).log()).sum())
    tok = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    logp, logq = p.log()[tok], q.log()[tok]
    assert kl_penalty(logp, logq, "k1").mean().item() == approx(true_kl, abs=0.01)
    assert kl_penalty(logp, logq, "k3").mean().item() == approx(true_kl, abs=0.01)


def test_shaped_rewards_put_clipped_score_on_last_token():
    logp = torch.tensor([[-1.0, -2.0, -1.0], [-0.5, -0.5, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -1.0], [-0.5, -1.5, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    rewards, kl = shaped_rewards(torch.tensor([2.0, -7.0]), logp, ref, mask, beta=0.1,
                                 score_clip=5.0)
    close(kl, [[0.5, -1.0, 0.0], [0.0, 1.0, 0.0]])
    close(rewards, [[-0.05, 0.1, 2.0], [0.0, -0.1 - 5.0, 0.0]])
    with pytest.raises(ValueError, match="row 1 has no token"):
        shaped_rewards(torch.zeros(2), logp, ref, torch.tensor([[1, 0, 0], [0, 0, 0]]), 0.1)


# -- GAE -------------------------------------------------------------------------------------
def test_gae_three_tokens_by_hand():
    # gamma 0.9, lambda 0.8; V(s_3) = 0 (episode ends).
    r = torch.tensor([[0.0, 0.0, 1.0]])
    v = torch.tensor([[0.5, 0.6, 0.7]])
    adv, ret = gae(r, v, torch.ones(1, 3), gamma=0.9, lam=0.8)
    d2 = 1.0 - 0.7                  # 0.3
    d1 = 0.0 + 0.9 * 0.7 - 0.6      # 0.03
    d0 = 0.0 + 0.9 * 0.6 - 0.5      # 0.04
    a2, a1 = d2, d1 + 0.72 * d2     # 0.3, 0.246
    a0 = d0 + 0.72 * a1             # 0.21712
    assert adv.tolist()[0] == approx([a0, a1, a2])
    assert ret.tolist()[0] == approx([a0 + 0.5, a1 + 0.6, a2 + 0.7])
    # gamma = lambda = 1: advantage = reward-to-go - V(s_t)
    adv1, ret1 = gae(r, v, torch.ones(1, 3), 1.0, 1.0)
    assert adv1.tolist()[0] == approx([0.5, 0.4, 0.3]) and ret1.tolist()[0] == approx([1, 1, 1])


def test_gae_masked_tail_does_not_bootstrap_from_padding():
    r = torch.tensor([[0.0, 0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 99.0, 99.0]])
    v = torch.tensor([[0.5, 0.6, 0.7, 0.0, 0.0], [0.5, 0.6, 0.7, 50.0, -3.0]])
    m = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 0, 0]])
    adv, ret = gae(r, v, m, gamma=0.9, lam=0.8)
    ref_adv, ref_ret = gae(r[:1, :3], v[:1, :3], torch.ones(1, 3), 0.9, 0.8)
    for row in range(2):  # garbage in padding changes nothing
        assert adv[row, :3].tolist() == approx(ref_adv[0].tolist())
        assert ret[row, :3].tolist() == approx(ref_ret[0].tolist())
        assert adv[row, 3:].tolist() == [0.0, 0.0] and ret[row, 3:].tolist() == [0.0, 0.0]
    with pytest.raises(ValueError, match="right-padded"):
        gae(r, v, torch.tensor([[1, 0, 1, 0, 0], [1, 1, 1, 0, 0]]), 1.0, 1.0)


# -- clipped losses --------------------------------------------------------------------------
def test_policy_loss_by_hand_and_zero_gradient_where_clipped():
    # ratios: 1.5 (A>0: clipped), 0.5 (A>0: unclipped branch is smaller), 1.1 (inside),
    #         0.5 (A<0: clipped), 1.5 (A<0: unclipped is smaller); last column is padding.
    ratio = torch.tensor([[1.5, 0.5, 1.1, 0.5, 1.5, 3.0]])
    old = torch.zeros(1, 6)
    logp = ratio.log().clone().requires_grad_(True)
    adv = torch.tensor([[2.0, 2.0, 1.0, -1.0, -1.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 0]])
    loss, stats = policy_loss(logp, old, adv, mask, clip_eps=0.2)
    # min terms: 1.2*2, 0.5*2, 1.1*1, 0.8*-1, 1.5*-1
    want = -(2.4 + 1.0 + 1.1 - 0.8 - 1.5) / 5
    assert loss.item() == approx(want)
    loss.backward()
    # d/dlogp of -(rho * A)/5 = -rho*A/5 on unclipped tokens, exactly 0 where clipped/padded
    g = logp.grad[0]
    assert g[0].item() == 0.0 and g[3].item() == 0.0 and g[5].item() == 0.0
    assert g[1].item() == approx(-0.5 * 2 / 5)
    assert g[2].item() == approx(-1.1 * 1 / 5)
    assert g[4].item() == approx(1.5 * 1 / 5)
    assert stats["clip_fraction"] == approx(2 / 5)
    k3 = [(x - 1) - math.log(x) for x in (1.5, 0.5, 1.1, 0.5, 1.5)]
    assert stats["approx_kl"] == approx(sum(k3) / 5)
    assert stats["ratio_max"] == approx(1.5)


def test_policy_loss_at_ratio_one_is_minus_mean_advantage():
    lp = torch.tensor([[-1.0, -2.0, -3.0]])
    adv = torch.tensor([[1.0, -3.0, 0.5]])
    loss, stats = policy_loss(lp, lp, adv, torch.ones(1, 3))
    assert loss.item() == approx(-(1.0 - 3.0 + 0.5) / 3)
    assert stats["clip_fraction"] == 0.0 and stats["approx_kl"] == approx(0.0, abs=1e-7)


def test_value_loss_by_hand_and_zero_gradient_where_clipped():
    old = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    values = torch.tensor([[1.5, 0.9, 1.5, 7.0]], requires_grad=True)
    returns = torch.tensor([[2.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = value_loss(values, old, returns, mask, clip_eps=0.2)
    # token 0: v 1.5 -> err .25; clipped 1.2 -> err .64 (larger: clipped, grad 0)
    # token 1: v 0.9 (inside) -> err .81 both
    # token 2: v 1.5 -> err 2.25; clipped 1.2 -> 1.44: unclipped is the max, grad flows
    assert loss.item() == approx(0.5 * (0.64 + 0.81 + 2.25) / 3)
    loss.backward()
    g = values.grad[0]
    assert g[0].item() == 0.0 and g[3].item() == 0.0
    assert g[1].item() == approx((0.9 - 0.0) / 3)   # 0.5 * 2 (v - R) / 3
    assert g[2].item() == approx((1.5 - 0.0) / 3)
    assert stats["value_clip_fraction"] == approx(1 / 3)
    plain, _ = value_loss(values, old, returns, mask, clip_eps=None)
    assert plain.item() == approx(0.5 * (0.25 + 0.81 + 2.25) / 3)


def test_explained_variance():
    ret = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    m = torch.ones(1, 4)
    assert explained_variance(ret, ret, m) == approx(1.0)
    assert explained_variance(torch.full_like(ret, 2.5), ret, m) == approx(0.0)
    assert explained_variance(ret + 1.0, ret, m) == approx(1.0)  # a constant offset is free
    assert math.isnan(explained_variance(ret, torch.ones(1, 4), m))


# -- KL controllers --------------------------------------------------------------------------
def test_adaptive_kl_controller_follows_the_formula():
    c = AdaptiveKLController(init_beta=0.1, target=6.0, horizon=10000)
    c.update(current_kl=7.2, n_steps=64)            # e = 0.2
    assert c.value == approx(0.1 * (1 + 0.2 * 64 / 10000))
    b = c.value
    c.update(current_kl=30.0, n_steps=256)          # e clipped to +0.2
    assert c.value == approx(b * (1 + 0.2 * 256 / 10000))
    b = c.value
    c.update(current_kl=5.4, n_steps=256)           # e = -0.1
    assert c.value == approx(b * (1 - 0.1 * 256 / 10000))
    b = c.value
    c.update(current_kl=0.0, n_steps=100)           # e clipped to -0.2
    assert c.value == approx(b * (1 - 0.2 * 100 / 10000))
    state = c.state_dict()
    assert all(type(v) is float for v in state.values())
    c2 = AdaptiveKLController(1.0, 6.0, 10000)
    c2.load_state_dict(state)
    assert c2.value == c.value
    with pytest.raises(ValueError, match="non-finite"):
        c.update(float("nan"), 64)
    with pytest.raises(ValueError, match="target"):
        AdaptiveKLController(0.1, 0.0, 100)


def test_fixed_kl_controller_and_factory():
    f = FixedKLController(0.02)
    assert f.update(100.0, 64) == 0.02 and f.state_dict() == {"value": 0.02}
    assert isinstance(make_kl_controller("adaptive", 0.2), AdaptiveKLController)
    with pytest.raises(ValueError, match="fixed"):
        make_kl_controller("pid", 0.2)


# -- reward-model loss -----------------------------------------------------------------------
def test_ranking_ties_make_no_pair():
    # D > C > A = B  (ranks of A, B, C, D)
    pairs = ranking_pairs([2, 2, 1, 0])
    assert sorted(pairs) == sorted([(2, 0), (2, 1), (3, 0), (3, 1), (3, 2)])
    assert (0, 1) not in pairs and (1, 0) not in pairs


def test_pairwise_rm_loss_by_hand_with_prompt_weighting():
    ls = lambda d: -math.log(1 / (1 + math.exp(-d)))  # noqa: E731  -log sigmoid(d)
    # prompt 0: responses 0,1,2 with ranking [0, 1, 1] -> pairs (0,1), (0,2); prompt 1: (4, 3)
    scores = torch.tensor([2.0, 1.0, -1.0, 0.5, 0.0], requires_grad=True)
    pairs = torch.tensor([[0, 1], [0, 2], [4, 3]])
    group = torch.tensor([0, 0, 1])
    loss, acc = pairwise_rm_loss(scores, pairs, group)
    want = 0.5 * (0.5 * (ls(1.0) + ls(3.0)) + ls(-0.5))
    assert loss.item() == approx(want)
    assert acc == approx(2 / 3)
    per_pair, _ = pairwise_rm_loss(scores, pairs, group, weighting="pair")
    assert per_pair.item() == approx((ls(1.0) + ls(3.0) + ls(-0.5)) / 3)
    loss.backward()
    assert scores.grad[0].item() < 0 < scores.grad[1].item()  # winner pushed up, loser down


def test_pairwise_rm_loss_from_pair_collator_and_all_ties():
    rows = [{"prompt_ids": [9, 10], "responses_ids": [[11], [12], [13]], "ranking": [1, 0, 1]},
            {"prompt_ids": [9], "responses_ids": [[11], [12]], "ranking": [0, 0]}]
    batch = PairCollator(max_len=16)(rows)
    pairs, group = pairs_from_collator(batch)
    assert pairs.tolist() == [[1, 0], [1, 2]] and group.tolist() == [0, 0]
    scores = torch.tensor([0.0, 1.0, 0.0, 3.0, 3.0])
    loss, acc = pairwise_rm_loss(scores, pairs, group)
    weighted = (torch.nn.functional.softplus(-(scores[pairs[:, 0]] - scores[pairs[:, 1]]))
                * batch["pair_weight"]).sum() / 1  # the collator's weights, one prompt
    assert loss.item() == approx(weighted.item()) and acc == 1.0
    s = torch.zeros(2, requires_grad=True)
    zero, acc0 = pairwise_rm_loss(s, torch.zeros(0, 2, dtype=torch.long), torch.zeros(0))
    zero.backward()
    assert zero.item() == 0.0 and math.isnan(acc0) and s.grad is not None
    with pytest.raises(ValueError, match="out of range"):
        pairwise_rm_loss(s, torch.tensor([[0, 5]]), torch.tensor([0]))


# -- Experience ------------------------------------------------------------------------------
def _experience(B: int = 4, P: int = 3, R: int = 5) -> Experience:
    g = torch.Generator().manual_seed(0)
    resp_len = torch.tensor([5, 2, 3, 1][:B])
    rmask = torch.arange(R)[None] < resp_len[:, None]
    exp, stats = make_experience(
        prompt_ids=torch.randint(7, 50, (B, P), generator=g), prompt_mask=torch.ones(B, P).bool(),
        response_ids=torch.randint(7, 50, (B, R), generator=g) * rmask, response_mask=rmask,
        logprobs=-torch.rand(B, R, generator=g), ref_logprobs=-torch.rand(B, R, generator=g),
        values=torch.randn(B, R, generator=g), scores=torch.randn(B, generator=g) * 3,
        beta=0.05, gamma=1.0, lam=0.95, score_clip=2.0)
    assert stats["response_length"] == approx(resp_len.float().mean().item())
    return exp


def test_make_experience_whitens_advantages_over_real_tokens():
    exp = _experience()
    m = exp.response_mask
    assert masked_mean(exp.advantages, m).item() == approx(0.0, abs=1e-5)
    assert masked_var(exp.advantages, m).item() == approx(1.0, abs=1e-4)
    assert (exp.advantages[~m] == 0).all() and (exp.returns[~m] == 0).all()
    # returns are the un-whitened GAE targets
    raw, ret = gae(exp.rewards, exp.values, m, 1.0, 0.95)
    assert torch.allclose(exp.returns, ret)


def test_experience_split_select_sequences_and_arrow_roundtrip():
    exp = _experience()
    parts = exp.split(2)
    assert [p.batch_size for p in parts] == [2, 2]
    assert torch.equal(Experience.concat(parts).values, exp.values)
    assert torch.equal(exp.select([3, 0]).scores, exp.scores[[3, 0]])
    with pytest.raises(ValueError, match="into 3"):
        exp.split(3)
    ids, mask = exp.sequences()
    assert ids.shape == (4, 8) and ids[:, exp.action_slice.start + 1:].equal(exp.response_ids)
    rb = exp.to_arrow()
    assert isinstance(rb, pa.RecordBatch) and "scores" in rb.schema.names
    back = Experience.from_arrow(rb)
    for f in ("prompt_ids", "response_ids", "advantages", "returns", "scores", "rewards"):
        assert torch.equal(getattr(back, f), getattr(exp, f)), f
    assert torch.equal(back.response_mask, exp.response_mask.bool())
    assert rollout_from_arrow(rb).batch_size == 4  # data_pipeline's reader accepts it too
    with pytest.raises(ValueError, match="scores"):
        Experience.from_arrow(rb.drop_columns(["scores"]))
    with pytest.raises(ValueError, match="'values'"):
        Experience(**{**exp.__dict__, "values": exp.values[:, :2]})
