"""The float32 Muon (workbench/organisms/muon.py): it must be torch's Muon step for step, with
only the Newton-Schulz precision changed, so Muon results here mean what they mean elsewhere."""
from __future__ import annotations

import pytest
import torch
import torch.optim._muon as torch_muon

from workbench.organisms.muon import IMPLEMENTATION, Muon, newton_schulz
from workbench.organisms.train import TrainConfig, make_optimizer

COEF = (torch_muon.DEFAULT_A, torch_muon.DEFAULT_B, torch_muon.DEFAULT_C)


@pytest.mark.parametrize("shape", [(48, 16), (16, 48), (32, 32)])
def test_newton_schulz_matches_torchs_bf16_iteration_and_orthogonalises(shape) -> None:
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    ours = newton_schulz(g, COEF, 5, 1e-7)
    ref = torch_muon._zeropower_via_newtonschulz(g, COEF, 5, 1e-7).float()
    assert ours.dtype == g.dtype and ours.shape == g.shape
    assert (ours - ref).abs().max() < 0.03 * ref.abs().max()  # bf16 has ~3 significant digits
    if shape[0] != shape[1]:  # well-conditioned: the iteration's singular values land in ~(0.5, 1.5)
        s = torch.linalg.svdvals(ours)
        assert 0.5 < s.min() and s.max() < 1.5
    # batched = one by one
    batch = torch.stack([g, 2 * g, -g])
    assert torch.allclose(newton_schulz(batch, COEF, 5, 1e-7)[2], -ours, atol=1e-6)
    assert torch.allclose(newton_schulz(batch, COEF, 5, 1e-7)[1], ours, atol=1e-5)


def test_step_is_torchs_muon_step_with_a_float32_iteration(monkeypatch) -> None:
    gen = torch.Generator().manual_seed(1)
    shapes = [(24, 16), (24, 16), (16, 40), (8, 8)]  # two share a shape: the batched path
    ours = [torch.nn.Parameter(torch.randn(*s, generator=gen)) for s in shapes]
    ref = [torch.nn.Parameter(p.detach().clone()) for p in ours]
    kw = dict(lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    o1, o2 = Muon(ours, **kw), torch.optim.Muon(ref, **kw)
    monkeypatch.setattr(torch_muon, "_zeropower_via_newtonschulz", newton_schulz)
    for _ in range(3):
        for p, q in zip(ours, ref):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        o1.step()
        o2.step()
    for p, q in zip(ours, ref):
        assert torch.equal(p, q)
    # the same state layout, so resumable runs save and load it as torch's
    s1, s2 = o1.state_dict(), o2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]
    for k in s2["state"]:
        assert torch.equal(s1["state"][k]["momentum_buffer"], s2["state"][k]["momentum_buffer"])


def test_muon_configs_name_their_implementation_and_adamw_keys_do_not_change() -> None:
    assert TrainConfig(steps=1, optimizer="muon").to_dict()["muon"] == IMPLEMENTATION
    assert "muon" not in TrainConfig(steps=1).to_dict()
    model = torch.nn.Module()
    model.embed_tokens, model.proj, model.norm = torch.nn.Embedding(10, 8), torch.nn.Linear(8, 8), torch.nn.LayerNorm(8)
    muon_opt, adamw = make_optimizer(model, TrainConfig(steps=1, optimizer="muon"))
    assert isinstance(muon_opt, Muon) and isinstance(adamw, torch.optim.AdamW)
    assert [p.shape for p in muon_opt.param_groups[0]["params"]] == [(8, 8)]  # the hidden matrix only
