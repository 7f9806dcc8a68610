"""Task heads (classification, regression, extractive QA) on GPT and BERT trunks, and their
export to transformers' ...ForSequenceClassification / ...ForQuestionAnswering: same logits.

Measured max |diff| values are printed (run with -s)."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

transformers = pytest.importorskip("transformers")

from trellis.model import ModelConfig
from trellis.model.build import build_trunk
from trellis.model.task_heads import TaskModel
from trellis.model.task_hf import save_hf_task

TOL = 1e-5


def _scramble(m: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded rows (pad 0 only after the last token), two segments for BERT."""
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(8, vocab, (3, 12), generator=g)
    lens = torch.tensor([12, 9, 5])
    mask = (torch.arange(12)[None] < lens[:, None]).long()
    ids = ids * mask  # pad id 0
    types = ((torch.arange(12)[None] >= 4) & mask.bool()).long()
    return ids, mask, types


@pytest.mark.parametrize("arch", ["gpt", "bert"])
@pytest.mark.parametrize("task,n", [("classification", 3), ("regression", 1), ("qa", 2)])
def test_exported_task_model_has_same_logits_in_transformers(tmp_path, arch, task, n):
    cfg = ModelConfig(arch=arch, vocab_size=50, n_layer=2, n_head=2, d_model=16, max_seq_len=16,
                      layer_norm_eps=1e-5 if arch == "gpt" else 1e-12)
    torch.manual_seed(0)
    model = TaskModel(build_trunk(cfg), task, n).eval()
    _scramble(model, 1)
    out = save_hf_task(model, tmp_path / "hf", labels=[f"c{i}" for i in range(n)]
                       if task == "classification" else None)
    hf = transformers.AutoConfig.from_pretrained(out)
    cls = getattr(transformers, hf.architectures[0])
    theirs = cls.from_pretrained(out, attn_implementation="eager").eval()
    ids, mask, types = _batch(cfg.vocab_size)
    with torch.no_grad():
        ours = model(ids, mask, types if arch == "bert" else None)
        kw = {"token_type_ids": types} if arch == "bert" else {}
        res = theirs(input_ids=ids, attention_mask=mask, **kw)
    if task == "qa":
        m = mask.bool()
        d = max((ours[..., 0] - res.start_logits)[m].abs().max().item(),
                (ours[..., 1] - res.end_logits)[m].abs().max().item())
    else:
        assert res.logits.shape == ours.shape
        d = (ours - res.logits).abs().max().item()
    print(f"\n{arch} {task}: max |logit diff| vs transformers {d:.3g}")
    assert d <= TOL
