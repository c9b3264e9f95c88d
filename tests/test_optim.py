"""optim.name=muon: which parameters Muon owns, and that its state survives a save/load exactly."""

import copy

import torch

from gpt.config import ModelConfig, OptimConfig
from gpt.model import GPT
from gpt.train.optim import Optimizers, make_optimizer


def step(model, opt, seed):
    x = torch.randint(0, 40, (2, 16), generator=torch.Generator().manual_seed(seed))
    _, loss = model(x, x.roll(-1, 1))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return loss.item()


def test_muon_takes_block_matrices_and_resumes_exactly():
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=40, block_size=16, n_layer=2, n_head=2, n_embd=16))
    opt = make_optimizer(model, OptimConfig(name="muon", lr=1e-2), "cpu")
    assert isinstance(opt, Optimizers)
    muon, adamw = opt.optimizers
    muon_ids = {id(p) for g in muon.param_groups for p in g["params"]}
    for name, p in model.named_parameters():
        assert (id(p) in muon_ids) == (p.dim() == 2 and ".h." in f".{name}"), name  # not embeddings / head
    losses = [step(model, opt, 0) for _ in range(5)]  # one batch: its loss must fall
    assert losses[-1] < losses[0]
    twin = copy.deepcopy(model)
    twin_opt = make_optimizer(twin, OptimConfig(name="muon", lr=1e-2), "cpu")
    twin_opt.load_state_dict(copy.deepcopy(opt.state_dict()))
    step(model, opt, 9)
    step(twin, twin_opt, 9)
    for a, b in zip(model.parameters(), twin.parameters()):
        assert torch.equal(a, b)
